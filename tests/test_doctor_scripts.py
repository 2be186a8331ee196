"""`finite doctor` on scripts that use the usual training tools, run as a user runs it.

Each test runs the real command in a subprocess on a script in tests/doctor_scripts and
compares what the doctor recorded with what the script saw itself through the tools'
own public API (``GradScaler.get_scale()``, the norm ``clip_grad_norm_`` returns, the
loss it computed, the losses the Hugging Face ``Trainer`` logs).
"""

import json
import math
import re

import pytest

from doctor_run import SCRIPTS, doctor, history


def seen_by_script(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def amp_run(tmp_path_factory):
    """The GradScaler script run once under the doctor: (process, its record, report dir)."""
    tmp_path = tmp_path_factory.mktemp("amp")
    seen_path = tmp_path / "seen"
    run = doctor(tmp_path, "--out", "rep", str(SCRIPTS / "amp_grad_scaler.py"), seen_path)
    assert run.returncode == 0, run.stderr
    return run, seen_by_script(seen_path), tmp_path / "rep"


def test_grad_scaler_scale_skips_and_clip_norms_match_what_the_script_saw(amp_run):
    _, seen, report = amp_run
    steps, _ = history(report / "history.jsonl")
    assert len(steps) == len(seen) == 16
    assert any(s["skipped"] for s in seen) and not all(s["skipped"] for s in seen)
    assert [s["loss_scale"] for s in steps] == [s["scale"] for s in seen]
    assert [s["skipped"] for s in steps] == [s["skipped"] for s in seen]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in seen], rel=1e-6)
    # clip_grad_norm_ returns the unscaled norm before clipping, as the doctor records it.
    for step, mine in zip(steps, seen, strict=True):
        if math.isfinite(mine["norm"]):
            assert step["grad_norm"] == pytest.approx(mine["norm"], rel=1e-5)
        else:
            assert step["grad_norm"] is None or not math.isfinite(step["grad_norm"])


def test_grad_scaler_and_clipping_are_findings_and_in_the_report(amp_run):
    _, seen, report = amp_run
    findings = {f["code"]: f for f in json.loads((report / "findings.json").read_text())}
    skipped = [i for i, s in enumerate(seen) if s["skipped"]]
    scaling = findings["loss_scaling"]
    assert scaling["title"] == f"GradScaler skipped {len(skipped)} of 16 steps"
    assert ", ".join(map(str, skipped)) in scaling["evidence"][1]["text"]
    clipped = sum(not s["norm"] <= 1.0 for s in seen)  # NaN/inf norms count as clipped
    assert findings["gradient_clipping"]["title"] == (
        f"clip_grad_norm_(max_norm=1) clipped the gradient norm on {clipped} of 16 calls"
    )
    page = (report / "report.html").read_text()
    assert "Loss scale" in page and (report / "loss_scale.png").is_file()
    assert "no clip threshold given" not in page  # the threshold is drawn on the plot


def test_max_steps_counts_the_steps_a_grad_scaler_skipped(tmp_path):
    seen_path = tmp_path / "seen"
    run = doctor(
        tmp_path, "--no-html", "--max-steps", "2", str(SCRIPTS / "amp_grad_scaler.py"), seen_path
    )
    assert run.returncode == 0, run.stderr
    assert "stopped after 2 steps" in run.stderr
    # The scaler skips the first steps; the stop is raised from the second scaler.step(),
    # so the script recorded one full step and the doctor two.
    assert [s["skipped"] for s in seen_by_script(seen_path)] == [True]
    steps, _ = history(tmp_path / "finite-report" / "history.jsonl")
    assert [s["skipped"] for s in steps] == [True, True]


def test_nan_loss_whose_step_never_ran_is_recorded_as_the_last_step(tmp_path):
    losses_path = tmp_path / "losses"
    run = doctor(
        tmp_path, "--no-html", str(SCRIPTS / "nan_loss_before_step.py"), losses_path, timeout=60
    )
    assert run.returncode == 1
    assert "FloatingPointError: loss is nan at step 3" in run.stderr
    losses = [float(v) for v in losses_path.read_text().splitlines()]
    steps, events = history(tmp_path / "finite-report" / "history.jsonl")
    recorded = [s["loss"] for s in steps]
    assert len(recorded) == len(losses) == 4
    assert recorded[:3] == pytest.approx(losses[:3], rel=1e-6)
    assert math.isnan(losses[3]) and math.isnan(recorded[3])
    # The model's output was finite: the loss computation made the NaN.
    assert any(e["step"] == 3 and e["origin"] == "<loss>" for e in events)
    findings = json.loads((tmp_path / "finite-report" / "findings.json").read_text())
    assert findings[0]["code"] == "nonfinite_loss"
    assert findings[0]["evidence"][0]["step"] == 3
    # optimizer.step() never ran at step 3: the weights it did not touch are not non-finite.
    assert [s["skipped"] for s in steps] == [False, False, False, True]
    assert "nonfinite_weights" not in {f["code"] for f in findings}


@pytest.mark.slow
def test_hugging_face_trainer_gets_a_loss_per_step_equal_to_its_own_log(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    run = doctor(tmp_path, "--no-html", str(SCRIPTS / "hf_trainer_gpt2.py"), tmp_path / "trainer")
    assert run.returncode == 0, run.stderr
    logged = json.loads(re.findall(r"^LOGGED (.*)$", run.stdout, re.MULTILINE)[-1])
    steps, _ = history(tmp_path / "finite-report" / "history.jsonl")
    assert len(steps) == len(logged["loss"]) == 6
    assert [s["loss"] for s in steps] == pytest.approx(logged["loss"], rel=1e-5)
    # The Trainer logs the norm clip_grad_norm_ returned (before clipping).
    assert [s["grad_norm"] for s in steps] == pytest.approx(logged["grad_norm"], rel=1e-4)
    findings = {
        f["code"] for f in json.loads((tmp_path / "finite-report" / "findings.json").read_text())
    }
    assert "gradient_clipping" in findings  # TrainingArguments.max_grad_norm=1.0
