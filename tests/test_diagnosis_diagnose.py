"""``diagnose``, ``Finding`` and ``print_findings``: sources, ordering, JSON, terminal."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

from finite import LossScaler, compensated
from finite.diagnosis import (
    PLOTS,
    SEVERITIES,
    Context,
    Evidence,
    Finding,
    diagnose,
    print_findings,
)
from finite.monitor import History, Monitor


def flat_history(steps=40, loss=1.0):
    history = History("float32")
    history.extend(
        {"step": i, "loss": loss, "grad_norm": 1.0, "nonfinite_grads": 0} for i in range(steps)
    )
    return history


def finding(code, severity, step, title="t"):
    return Finding(code, severity, title, (Evidence(f"at {step}", step=step),), "c", "f", ())


# ------------------------------------------------------------------ Finding


def test_finding_to_dict_has_the_report_fields_and_is_json():
    item = Finding(
        "exploding_gradients",
        "warning",
        "Exploding gradients",
        [Evidence("norm 1e4 at step 3", step=3, module="rnn", value=1e4, plot="grad_norm")],
        "cause",
        "fix",
        ["a paper"],
    )
    data = json.loads(json.dumps(item.to_dict(), allow_nan=False))
    assert list(data) == ["code", "severity", "title", "evidence", "cause", "fix", "references"]
    assert data["evidence"] == [
        {
            "text": "norm 1e4 at step 3",
            "step": 3,
            "module": "rnn",
            "value": 1e4,
            "plot": "grad_norm",
        }
    ]
    assert data["references"] == ["a paper"]


def test_finding_is_frozen_and_stores_tuples():
    item = Finding("x", "info", "t", [Evidence("e")], references=["r"])
    assert isinstance(item.evidence, tuple) and isinstance(item.references, tuple)
    with pytest.raises(AttributeError):
        item.code = "y"


def test_finding_rejects_an_unknown_severity():
    with pytest.raises(ValueError, match="severity"):
        Finding("x", "error", "t")


def test_finding_rejects_evidence_that_is_not_evidence():
    with pytest.raises(TypeError, match="Evidence"):
        Finding("x", "info", "t", ["a string"])


def test_evidence_rejects_an_unknown_plot():
    with pytest.raises(ValueError, match="plot"):
        Evidence("e", plot="weights")


def test_evidence_plots_are_the_report_plots():
    assert set(PLOTS) == {
        "loss",
        "grad_norm",
        "grad_norm_heatmap",
        "histograms",
        "loss_scale",
        "update_ratio",
    }


def test_evidence_converts_numpy_numbers_to_plain_ones():
    import numpy as np

    item = Evidence("e", step=np.int64(4), value=np.float32(0.5))
    assert type(item.step) is int and type(item.value) is float
    json.dumps(item.to_dict())


def test_first_step_is_the_earliest_evidence_step():
    item = Finding("x", "info", "t", (Evidence("a", step=9), Evidence("b"), Evidence("c", step=4)))
    assert item.first_step == 4
    assert Finding("x", "info", "t", (Evidence("a"),)).first_step is None


# ------------------------------------------------------------------ diagnose


def test_diagnose_sorts_by_severity_then_first_step_then_rule_order():
    rules = [
        lambda h, c: finding("late_warning", "warning", 9),
        lambda h, c: finding("info", "info", 0),
        lambda h, c: finding("early_warning", "warning", 2),
        lambda h, c: finding("critical", "critical", 50),
        lambda h, c: finding("tie_second", "warning", 2),
        lambda h, c: None,
    ]
    codes = [f.code for f in diagnose(flat_history(), rules=rules)]
    assert codes == ["critical", "early_warning", "tie_second", "late_warning", "info"]


def test_diagnose_puts_findings_without_a_step_last_within_their_severity():
    rules = [
        lambda h, c: Finding("no_step", "warning", "t"),
        lambda h, c: finding("stepped", "warning", 100),
    ]
    assert [f.code for f in diagnose(flat_history(), rules=rules)] == ["stepped", "no_step"]


def test_diagnose_rejects_a_rule_that_returns_something_else():
    with pytest.raises(TypeError, match="returned dict"):
        diagnose(flat_history(), rules=[lambda h, c: {}])


def test_diagnose_rejects_an_unknown_source():
    with pytest.raises(TypeError, match="source must be"):
        diagnose(42)


def test_diagnose_rejects_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        diagnose(tmp_path / "nope.jsonl")


def test_diagnose_rejects_a_directory_without_history(tmp_path):
    with pytest.raises(FileNotFoundError, match="no history"):
        diagnose(tmp_path)


def test_diagnose_of_a_jsonl_file_equals_diagnose_of_the_history(tmp_path):
    history = flat_history(loss=0.7)  # a plateau
    history.to_jsonl(tmp_path / "history.jsonl")
    direct = [f.to_dict() for f in diagnose(history)]
    assert direct and [f.to_dict() for f in diagnose(tmp_path / "history.jsonl")] == direct
    assert [f.to_dict() for f in diagnose(str(tmp_path))] == direct


def test_diagnose_passes_the_context_to_the_rules():
    seen = []
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    diagnose(
        flat_history(),
        model=model,
        optimizer=optimizer,
        lost_update_fraction=0.3,
        rules=[lambda h, c: seen.append(c)],
    )
    (context,) = seen
    assert isinstance(context, Context)
    assert context.learning_rate == 0.25 and context.lost_update_fraction == 0.3
    assert {n: f.name for n, f in context.weight_formats.items()} == {
        "weight": "bfloat16",
        "bias": "bfloat16",
    }
    assert context.format.name == "float32"


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_diagnose_rejects_a_lost_update_fraction_outside_zero_one(bad):
    with pytest.raises(ValueError, match="lost_update_fraction"):
        diagnose(flat_history(), lost_update_fraction=bad)


def test_diagnose_takes_model_optimizer_and_scaler_from_a_monitor():
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = LossScaler(min_scale=4.0)
    seen = []
    with Monitor(model, optimizer, scaler=scaler) as monitor:
        loss = model(torch.randn(8, 4)).square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        monitor.step(loss.detach())
        diagnose(monitor, rules=[lambda h, c: seen.append((h, c))])
    history, context = seen[0]
    assert len(history.steps) == 1
    assert context.learning_rate == 0.5 and context.min_loss_scale == 4.0
    assert set(context.weight_formats) == {"weight", "bias"}


def test_diagnose_reads_the_swamping_meter_of_a_compensated_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    optimizer = compensated(torch.optim.SGD(model.parameters(), lr=1e-6), "kahan")
    model(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().mean().backward()
    optimizer.step()
    seen = []
    diagnose(flat_history(), model=model, optimizer=optimizer, rules=[lambda h, c: seen.append(c)])
    assert seen[0].compensation == "kahan"
    # lr * grad is about 1e-6: every update is below half a bfloat16 ulp of the weights.
    assert seen[0].lost_update_fraction > 0.9


# ------------------------------------------------------------------ terminal


def render(findings):
    buffer = io.StringIO()
    print_findings(findings, console=Console(file=buffer, width=120, color_system=None))
    return buffer.getvalue()


def test_print_findings_shows_severity_title_evidence_cause_fix_and_references():
    item = Finding(
        "loss_plateau",
        "warning",
        "Loss is not decreasing",
        (Evidence("loss stayed at 0.69 over steps 0-99", step=0),),
        "The loss is stuck.",
        "Raise the learning rate.",
        ("A. Karpathy, 2019.",),
    )
    text = render([item])
    for part in (
        "WARNING",
        "Loss is not decreasing",
        "loss stayed at 0.69",
        "The loss is stuck.",
        "Raise the learning rate.",
        "Karpathy",
        "loss_plateau",
        "1 finding(s): 1 warning",
    ):
        assert part in text


def test_print_findings_says_so_when_there_is_nothing():
    assert "No numerical problems found." in render([])


def test_print_findings_rejects_other_objects():
    with pytest.raises(TypeError, match="Finding"):
        render(["not a finding"])


def test_severities_are_ordered_most_urgent_first():
    assert SEVERITIES == ("critical", "warning", "info")
