"""`finite doctor` as a user runs it: a real process on small scripts in tests/doctor_scripts.

Each test checks what the script itself did (its exit, the files it wrote, the loss it
computed) against what the doctor reports.
"""

import json
import math
import sys

import pytest
import torch
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as optimizer_hooks

from doctor_run import SCRIPTS, doctor, history
from finite.doctor import run_script
from finite.monitor import Monitor
from host_reads import counted_host_reads

SEVERE = ("critical", "warning")


def steps(history_path):
    return history(history_path)[0]


def test_healthy_script_exits_0_with_no_finding_above_info_and_a_report(tmp_path):
    run = doctor(tmp_path, "--out", "rep", str(SCRIPTS / "healthy.py"), "a", "b")
    assert run.returncode == 0, run.stderr
    assert "trained 3" in run.stdout  # sys.argv is SCRIPT a b
    findings = json.loads((tmp_path / "rep" / "findings.json").read_text())
    assert [f for f in findings if f["severity"] in SEVERE] == []
    assert (tmp_path / "rep" / "report.html").is_file()
    assert len(steps(tmp_path / "rep" / "history.jsonl")) == 12


def test_script_that_goes_nan_and_raises_exits_1_and_names_the_origin_module(tmp_path):
    run = doctor(tmp_path, "--out", "rep", "--no-html", str(SCRIPTS / "goes_nan.py"))
    assert run.returncode == 1
    assert "RuntimeError: loss is nan at step 0" in run.stderr  # the script's traceback
    events = [
        json.loads(line)
        for line in (tmp_path / "rep" / "history.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "event"
    ]
    # The script's model is Sequential(Linear, Log, Linear): log of a negative is NaN.
    assert any(e["origin"] == "1" and e["origin_type"] == "Log" for e in events)
    findings = json.loads((tmp_path / "rep" / "findings.json").read_text())
    assert findings[0]["severity"] == "critical"
    assert not (tmp_path / "rep" / "report.html").exists()  # --no-html


def test_sys_exit_3_gives_exit_status_3_and_a_report(tmp_path):
    run = doctor(tmp_path, "--no-html", str(SCRIPTS / "exits_3.py"))
    assert run.returncode == 3
    assert len(steps(tmp_path / "finite-report" / "history.jsonl")) == 2


def test_max_steps_stops_the_script_after_that_many_optimizer_steps(tmp_path):
    count = tmp_path / "count"
    run = doctor(tmp_path, "--no-html", "--max-steps", "2", str(SCRIPTS / "counts_steps.py"), count)
    assert run.returncode == 0, run.stderr
    # The stop is raised from the second optimizer.step(): the line after it never ran.
    assert count.read_text() == "1"
    assert len(steps(tmp_path / "finite-report" / "history.jsonl")) == 2


def test_loss_is_recorded_unscaled_when_the_script_uses_a_loss_scaler(tmp_path):
    written = tmp_path / "losses"
    run = doctor(tmp_path, "--no-html", str(SCRIPTS / "writes_losses.py"), written)
    assert run.returncode == 0, run.stderr
    expected = [float(v) for v in written.read_text().splitlines()]
    recorded = [s["loss"] for s in steps(tmp_path / "finite-report" / "history.jsonl")]
    assert recorded == pytest.approx(expected, rel=1e-6)


def test_losses_of_accumulated_backward_calls_are_summed_per_step(tmp_path):
    written = tmp_path / "sums"
    result = run_script(SCRIPTS / "accumulates.py", [str(written)])
    assert result.exit_status == 0
    expected = [float(v) for v in written.read_text().splitlines()]
    recorded = result.reports[0].history.steps["loss"].tolist()
    assert recorded == pytest.approx(expected, rel=1e-6)


def test_missing_script_exits_2(tmp_path):
    assert doctor(tmp_path, "no_such_script.py").returncode == 2


def test_every_hook_and_wrapper_is_removed_after_the_run():
    backward, init = torch.Tensor.backward, torch.optim.Optimizer.__init__
    pre, post = (
        dict(module_hooks._global_forward_pre_hooks),
        dict(module_hooks._global_forward_hooks),
    )
    step_post = dict(optimizer_hooks._global_optimizer_post_hooks)
    argv, path = list(sys.argv), list(sys.path)
    result = run_script(SCRIPTS / "exits_3.py", [])
    assert result.exit_status == 3 and len(result.reports) == 1
    assert torch.Tensor.backward is backward and torch.optim.Optimizer.__init__ is init
    assert dict(module_hooks._global_forward_pre_hooks) == pre
    assert dict(module_hooks._global_forward_hooks) == post
    assert dict(optimizer_hooks._global_optimizer_post_hooks) == step_post
    assert sys.argv == argv and sys.path == path
    assert all(math.isfinite(s) for s in result.reports[0].history.steps["loss"])


def test_unknown_precision_exits_2_before_running_the_script(tmp_path):
    count = tmp_path / "count"
    run = doctor(tmp_path, "--precision", "float99", str(SCRIPTS / "counts_steps.py"), count)
    assert run.returncode == 2
    assert "float99" in run.stderr
    assert not count.exists()


def test_two_models_get_a_report_each_and_ctrl_c_exits_130(tmp_path):
    run = doctor(tmp_path, "--no-html", str(SCRIPTS / "two_models.py"))
    assert run.returncode == 130
    # Generator runs first (inside the critic's step), so it is model 0.
    report = tmp_path / "finite-report"
    assert len(steps(report / "0-Generator" / "history.jsonl")) == 3
    # The critic also runs in the generator's last step, after which the script ends:
    # that is no step of the critic's own, so it has its 3 optimizer steps, each with a loss.
    critic = steps(report / "1-Critic" / "history.jsonl")
    assert len(critic) == 3
    assert all(math.isfinite(s["loss"]) for s in critic)
    findings = json.loads((report / "1-Critic" / "findings.json").read_text())
    assert [f for f in findings if f["severity"] in SEVERE] == []


# ---------------------------------------------------------------------- GradScaler
def grad_scaler_run(steps_with_inf, monitor_kwargs=None, fused=False):
    """Train a Linear with torch.amp.GradScaler on the CPU under a Monitor, calling
    monitor.step(loss) after scaler.update(); an inf input at the given steps makes the
    scaler skip them. Returns the history, what the scaler said itself through its public
    API (scale used, skipped), and the host reads of backward() and monitor.step()."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    if fused:  # GradScaler calls it even to skip: it skips inside its kernel
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    monitor = Monitor(model, optimizer, scaler=scaler, **(monitor_kwargs or {}))
    seen, reads = [], 0
    for step in range(5):
        x = torch.randn(8, 4)
        if step in steps_with_inf:
            x[0, 0] = float("inf")
        optimizer.zero_grad()
        scale = scaler.get_scale()
        with counted_host_reads() as counts:
            loss = model(x).square().mean()
            scaler.scale(loss).backward()
        reads += sum(counts.values())
        scaler.step(optimizer)
        scaler.update()
        with counted_host_reads() as counts:
            monitor.step(loss)
        reads += sum(counts.values())
        seen.append((scale, scaler.get_scale() < scale))
    history = monitor.history
    monitor.close()
    return history, seen, reads


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adam"])
def test_monitor_marks_the_steps_a_grad_scaler_skipped_and_records_its_scale(fused):
    history, seen, _ = grad_scaler_run({1, 3}, fused=fused)
    assert history.steps["loss_scale"].tolist() == [scale for scale, _ in seen]
    assert history.steps["skipped"].tolist() == [skipped for _, skipped in seen]
    assert [skipped for _, skipped in seen] == [False, True, False, True, False]


def test_monitor_with_a_grad_scaler_reads_nothing_on_the_host_between_syncs():
    _, _, reads = grad_scaler_run({1}, {"sync_every": 100})
    assert reads == 0


def test_raise_on_nonfinite_lets_a_grad_scaler_skip_its_overflow_step():
    # The scaler handles the overflow (it skips the step): nothing to raise.
    history, _, _ = grad_scaler_run({2}, {"on_nonfinite": "raise"})
    assert history.steps["skipped"].tolist() == [False, False, True, False, False]
