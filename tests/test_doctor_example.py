"""The built-in example of `finite doctor`: the lab's fp16-underflow language model.

The command is run as a user runs it (a real process, no SCRIPT); the mechanism is checked
against the same model in float32, and the losses against the entropy of the shipped
text's character frequencies, counted here in float64.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from browser import CHROMIUM, rendered_images
from finite.lab import fp16_underflow
from finite.lab.tiny_lm import TEXT_NAME

SEVERE = ("critical", "warning")
FLOAT16_TINY = torch.finfo(torch.float16).tiny  # 2**-14, the smallest normal number
FLOAT16_SMALLEST_SUBNORMAL = 2.0**-24


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- the shipped text


def shipped_text_bytes() -> bytes:
    return (resources.files("finite.lab") / "data" / TEXT_NAME).read_bytes()


def test_the_shipped_text_is_found_by_importlib_resources_and_is_non_empty_utf8():
    data = shipped_text_bytes()
    text = data.decode("utf-8", errors="strict")
    assert len(text.strip()) > 5000


def character_entropy() -> float:
    """Entropy (nats) of the text's character frequencies: the lowest cross-entropy a
    model that ignores context can reach on it."""
    text = shipped_text_bytes().decode("utf-8")
    counts = collections.Counter(text)
    return -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())


# ---------------------------------------------------------------------- the command


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# Imported at start-up from PYTHONPATH: the packages that only the extras install cannot
# be imported, as on a fresh `pip install -e .` (the README's main-job command).
BLOCKER = """
import sys

BLOCKED = {blocked!r}


class OnlyBaseDependencies:
    # Wraps each finder: a blocked package is found by none of them, so it is missing to
    # `import` and to importlib.util.find_spec alike.
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [OnlyBaseDependencies(finder) for finder in sys.meta_path]
"""


def extras_only_packages() -> set[str]:
    """Import names of the packages the extras add to the base dependencies."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("-", "_")

    base = {name(r) for r in project["dependencies"]}
    extras = {name(r) for group in project["optional-dependencies"].values() for r in group}
    return extras - base - {"finite"}


# One run of the command (about 10 s of CPU) serves every test that reads it; those tests
# are marked slow. It runs with the base dependencies only.
@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path_factory.mktemp("doctor")
    site = root / "site"
    site.mkdir()
    blocked = extras_only_packages()
    assert {"pytest", "hypothesis", "scipy"} <= blocked
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
    out = root / "report"
    run = subprocess.run(
        [sys.executable, "-m", "finite", "doctor", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    return run, out


def losses(out: Path, run: str) -> np.ndarray:
    lines = (out / run / "history.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    return np.asarray([r["loss"] for r in rows if r.get("kind") == "step"], dtype=float)


@pytest.mark.slow
def test_doctor_without_a_script_exits_0(example):
    run, _ = example
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_doctor_without_a_script_prints_fp16_gradient_underflow(example):
    run, _ = example
    assert "fp16_gradient_underflow" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["broken", "fixed"])
@pytest.mark.parametrize("file", ["report.html", "findings.json", "history.jsonl"])
def test_doctor_without_a_script_writes_the_report_of_both_runs(example, run_name, file):
    _, out = example
    assert (out / run_name / file).stat().st_size > 0


@pytest.mark.slow
def test_the_broken_runs_first_finding_is_fp16_gradient_underflow(example):
    _, out = example
    findings = json.loads((out / "broken" / "findings.json").read_text(encoding="utf-8"))
    assert findings[0]["code"] == "fp16_gradient_underflow"


@pytest.mark.slow
def test_the_fixed_run_has_no_finding_above_info(example):
    _, out = example
    findings = json.loads((out / "fixed" / "findings.json").read_text(encoding="utf-8"))
    assert [f["code"] for f in findings if f["severity"] in SEVERE] == []


@pytest.mark.slow
def test_the_broken_run_ends_above_the_entropy_of_the_character_frequencies(example):
    # It never learns what a model blind to context knows.
    _, out = example
    assert losses(out, "broken")[-10:].mean() > character_entropy()


@pytest.mark.slow
def test_the_fixed_run_ends_well_below_the_entropy_of_the_character_frequencies(example):
    # It learns from context: the next character given the ones before it.
    _, out = example
    assert losses(out, "fixed")[-10:].mean() < character_entropy() - 0.4


class ImageCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_broken_report_opens_in_headless_chromium_with_every_image_decoded(example, tmp_path):
    _, out = example
    page = (out / "broken" / "report.html").read_text(encoding="utf-8")
    counter = ImageCounter()
    counter.feed(page)
    images, broken, dom = rendered_images(out / "broken" / "report.html", tmp_path / "profile")
    assert (images, broken) == (counter.images, 0)
    assert "fp16_gradient_underflow" in dom


# ---------------------------------------------------------------------- the mechanism


def gradients_below_the_head(model: torch.nn.Module, scale: float) -> torch.Tensor:
    """Step 0's gradients of every parameter but the head's, divided by ``scale``, in
    float64."""
    loss = fp16_underflow.mean_loss(model, *fp16_underflow.batches(0))
    (loss / fp16_underflow.MICRO_BATCHES * scale).backward()
    below = [p for name, p in model.named_parameters() if name != "head.weight"]
    return torch.cat([p.grad.double().flatten() / scale for p in below])


def float32_reference() -> torch.Tensor:
    # The same (float16-rounded) weights, run and differentiated in float32.
    return gradients_below_the_head(fp16_underflow.build_model().float(), 1.0)


def test_the_right_characters_logit_gradient_is_subnormal_and_the_others_flush_to_zero():
    # d(mean loss)/d(logit) = (softmax - one_hot) / tokens, in float64 from float32 logits.
    inputs, targets = fp16_underflow.batches(0)
    with torch.no_grad():
        logits = fp16_underflow.build_model().float()(inputs).double().flatten(0, 1)
    tokens = logits.shape[0] * fp16_underflow.MICRO_BATCHES
    grad = (logits.softmax(dim=1) - torch.nn.functional.one_hot(targets.flatten())) / tokens
    right = grad.gather(1, targets.flatten()[:, None]).abs()
    others = grad.abs().scatter(1, targets.flatten()[:, None], 0.0)
    assert bool(((right >= FLOAT16_SMALLEST_SUBNORMAL) & (right < FLOAT16_TINY)).all())
    assert float(others.max()) < FLOAT16_SMALLEST_SUBNORMAL / 2  # rounds to 0 in float16


def test_float32_gradients_below_the_head_lie_below_float16s_smallest_normal():
    reference = float32_reference()
    assert float((reference.abs() < FLOAT16_TINY).double().mean()) > 0.99


@pytest.mark.parametrize("scale", [1.0, 2.0**16])
def test_float16_zero_or_subnormal_share_matches_the_float32_reference(scale):
    # The share float16 stores as zero or subnormal is the share of the exact gradient
    # (times the scale) that lies below 2**-14: 100% unscaled, a few % (exact zeros:
    # characters missing from the batch) at 2**16.
    reference = float32_reference()
    float16 = gradients_below_the_head(fp16_underflow.build_model(), scale)
    share16 = float(((float16 * scale).abs() < FLOAT16_TINY).double().mean())
    share32 = float(((reference * scale).abs() < FLOAT16_TINY).double().mean())
    assert share16 == pytest.approx(share32, abs=0.01)


def test_the_unscaled_float16_backward_pass_loses_the_gradient_below_the_head():
    reference = float32_reference()
    float16 = gradients_below_the_head(fp16_underflow.build_model(), 1.0)
    assert float((float16 - reference).norm() / reference.norm()) > 0.9


def test_a_loss_scale_of_2_to_16_keeps_the_gradient_below_the_head_within_2_to_minus_8():
    reference = float32_reference()
    float16 = gradients_below_the_head(fp16_underflow.build_model(), 2.0**16)
    assert float((float16 - reference).norm() / reference.norm()) < 2.0**-8
