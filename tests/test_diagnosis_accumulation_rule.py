"""fp16_accumulation_overflow: a half-precision .grad that overflowed on the micro-batch sum.

Synthetic histories are built directly (``History.extend`` with the records a monitor
writes), so every number the rule sees is chosen here; one end-to-end run checks the
rule on what a real Monitor records, against a float64 sum of the same gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from finite import MasterWeights, diagnose
from finite.diagnosis import Context
from finite.diagnosis import rules as R
from finite.formats import get_format
from finite.monitor import Monitor, NonfiniteEvent, TensorSummary
from finite.monitor.history import History

STEPS = 20
FINITE_GRADS = (TensorSummary(64, 0, None, None),)
BAD_GRADS = (TensorSummary(64, -1, None, None),)


def overflow_event(step=5, inputs=FINITE_GRADS, outputs=FINITE_GRADS, parameters=("2.bias",)):
    return NonfiniteEvent(
        step, "backward", "2", "Linear", inputs=inputs, outputs=outputs, parameters=parameters
    )


def make_history(*, fmt="float16", calls=32, events=(), loss=None, skipped=()):
    """A run of a Linear-ReLU-Linear model whose leaf modules ran ``calls`` times a step."""
    records = []
    for i in range(STEPS):
        module = {"calls": calls(i) if callable(calls) else calls, "numel": 64, "absmax": 2.0}
        records.append(
            {
                "step": i,
                "rank": 0,
                "loss": loss(i) if loss is not None else 1.0 / (1 + i),
                "loss_scale": math.nan,
                "skipped": i in skipped,
                "measured": True,
                "grad_norm": 1.0,
                "nonfinite_grads": 0,
                "params": {},
                "modules": {
                    "0": {"type": "Linear", **module},
                    "1": {"type": "ReLU", **module},
                    "2": {"type": "Linear", **module},
                },
            }
        )
    history = History(fmt)
    history.extend(records, list(events))
    return history


def context(fmt="float16", **fields):
    return Context(format=get_format(fmt), **fields)


def test_fires_critical_at_the_step_of_a_parameter_only_overflow_with_32_micro_batches():
    finding = R.fp16_accumulation_overflow(make_history(events=[overflow_event(5)]), context())
    assert (finding.code, finding.severity, finding.first_step) == (
        "fp16_accumulation_overflow",
        "critical",
        5,
    )
    assert "32 micro-batches" in finding.title and "float16" in finding.title
    assert "MasterWeights" in finding.fix and "accumulate_grads_" in finding.fix


def test_evidence_names_the_parameter_the_module_and_the_format_maximum():
    finding = R.fp16_accumulation_overflow(make_history(events=[overflow_event(5)]), context())
    text = " ".join(e.text for e in finding.evidence)
    assert "2.bias" in text and "6.55e+04" in text
    assert any(e.module == "2" for e in finding.evidence)


def test_silent_when_each_module_ran_once_per_step():
    history = make_history(calls=1, events=[overflow_event(5)])
    assert R.fp16_accumulation_overflow(history, context()) is None


def test_silent_for_float32_parameters():
    history = make_history(fmt="float32", events=[overflow_event(5)])
    assert R.fp16_accumulation_overflow(history, context("float32")) is None


def test_a_float32_model_parameter_overrides_a_float16_monitor_format():
    history = make_history(events=[overflow_event(5)])
    known = context(weight_formats={"2.bias": get_format("float32")})
    assert R.fp16_accumulation_overflow(history, known) is None


def test_a_float16_model_parameter_overrides_a_float32_monitor_format():
    history = make_history(fmt="float32", events=[overflow_event(5)])
    known = context("float32", weight_formats={"2.bias": get_format("float16")})
    assert R.fp16_accumulation_overflow(history, known).code == "fp16_accumulation_overflow"


def test_silent_when_an_activation_gradient_was_already_non_finite():
    history = make_history(events=[overflow_event(5, inputs=BAD_GRADS)])
    assert R.fp16_accumulation_overflow(history, context()) is None


def test_silent_when_the_forward_pass_of_that_step_was_non_finite():
    history = make_history(events=[overflow_event(5)], loss=lambda i: math.inf if i >= 5 else 1.0)
    assert R.fp16_accumulation_overflow(history, context()) is None


def test_silent_on_a_step_the_loss_scaler_skipped():
    history = make_history(events=[overflow_event(5)], skipped={5})
    assert R.fp16_accumulation_overflow(history, context()) is None


def test_silent_on_a_backward_event_without_parameters():
    history = make_history(events=[overflow_event(5, parameters=())])
    assert R.fp16_accumulation_overflow(history, context()) is None


@settings(max_examples=40, deadline=None)
@given(calls=st.lists(st.integers(1, 64), min_size=STEPS, max_size=STEPS))
def test_fires_exactly_when_the_median_of_the_fewest_calls_per_step_is_at_least_two(calls):
    history = make_history(calls=lambda i: calls[i], events=[overflow_event(5)])
    finding = R.fp16_accumulation_overflow(history, context())
    ordered = sorted(calls)
    median = (ordered[STEPS // 2 - 1] + ordered[STEPS // 2]) / 2
    assert (finding is not None) == (median >= 2)


# ------------------------------------------------------------------ a real run

MICRO_BATCHES = 8
EXAMPLES = 64


def micro_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(MICRO_BATCHES):
        x = torch.randn(EXAMPLES, 4, generator=g)
        yield x, x.sum(1, keepdim=True) + 100.0  # targets far from the initial outputs


def accumulate(model, master=None):
    """One window of summed-loss micro-batches under a Monitor; the monitor, closed."""
    with Monitor(model, histograms_every=0) as monitor:
        for x, y in micro_batches():
            F.mse_loss(model(x.half()).float(), y, reduction="sum").backward()
            if master is not None:
                master.accumulate_grads_()
        monitor.step(torch.tensor(1.0))
    return monitor


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1).half()


def test_the_float64_sum_of_the_micro_batch_gradients_passes_float16_max_though_each_fits():
    # The reference: each micro-batch's bias gradient alone, summed in float64.
    net = model()
    grads = []
    for x, y in micro_batches():
        net.zero_grad()
        F.mse_loss(net(x.half()).float(), y, reduction="sum").backward()
        grads.append(net.bias.grad.double().abs().max().item())
    fp16_max = torch.finfo(torch.float16).max
    assert max(grads) < fp16_max < sum(grads)


def test_a_real_float16_accumulation_overflow_is_diagnosed_first():
    findings = diagnose(accumulate(model()))
    assert findings[0].code == "fp16_accumulation_overflow"
    assert f"{MICRO_BATCHES} micro-batches" in findings[0].title


def test_float32_accumulation_of_the_same_micro_batches_is_not_flagged():
    net = model()
    monitor = accumulate(net, MasterWeights(net.parameters()))
    assert all(f.code != "fp16_accumulation_overflow" for f in diagnose(monitor))


@pytest.mark.parametrize("rule", [R.fp16_accumulation_overflow])
def test_rule_is_registered_before_the_non_finite_gradients_it_explains(rule):
    assert R.RULES.index(rule) < R.RULES.index(R.nonfinite_gradients)
