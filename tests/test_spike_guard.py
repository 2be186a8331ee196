"""SpikeGuard against a re-statement of the rolling sigma rule with Python's statistics."""

from __future__ import annotations

import collections
import io
import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from finite.clipping.spike_guard import SpikeGuard, SpikeRecord
from host_reads import counted_host_reads

NAN = math.nan
INF = math.inf


def sigma_rule(values, sigma=6.0, window=128, min_history=64):
    """The rule restated: per step, (is spike, threshold, closeness to a tie).

    The history holds the last ``window`` accepted values (finite and not spikes); a finite
    value is judged only once ``min_history`` are there, against mean + sigma * sample std.
    """
    history: collections.deque[float] = collections.deque(maxlen=window)
    out = []
    for v in values:
        threshold = INF
        if len(history) >= min_history:
            threshold = statistics.fmean(history) + sigma * statistics.stdev(history)
        spike = not math.isfinite(v) or v > threshold
        gap = v - threshold
        margin = abs(gap) / max(abs(threshold), 1.0) if math.isfinite(gap) else 1.0
        out.append((spike, threshold, margin))
        if not spike:
            history.append(v)
    return out


def loss_trace(seed: int, steps: int = 300) -> list[float]:
    """A decaying loss with noise, a few spikes of 1.5-4x and two NaN steps."""
    rng = np.random.default_rng(seed)
    loss = 3.0 * np.exp(-np.arange(steps) / 200.0) + 0.5 + rng.normal(0.0, 0.02, steps)
    spikes = rng.choice(np.arange(80, steps), size=6, replace=False)
    loss[spikes] *= rng.uniform(1.5, 4.0, size=spikes.size)
    loss[[100, 230]] = np.nan
    return loss.tolist()


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def judge(guard, values):
    return [bool(guard(torch.tensor(v, dtype=torch.float64))) for v in values]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flags_match_the_restated_rule_on_a_recorded_loss_trace(seed):
    values = loss_trace(seed)
    expected = sigma_rule(values, sigma=4.0, window=64, min_history=32)
    assert min(m for _, _, m in expected) > 1e-9, "the trace has no near-ties"
    assert sum(s for s, _, _ in expected) >= 4, "the trace has spikes"
    assert judge(SpikeGuard(sigma=4.0, window=64, min_history=32), values) == [
        s for s, _, _ in expected
    ]


@given(
    values=st.lists(
        st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False) | st.sampled_from([NAN, INF]),
        min_size=1,
        max_size=80,
    ),
    sigma=st.floats(0.5, 8.0),
    window=st.integers(2, 12),
    data=st.data(),
)
def test_flags_and_thresholds_match_the_restated_rule_on_any_sequence(values, sigma, window, data):
    min_history = data.draw(st.integers(2, window))
    expected = sigma_rule(values, sigma, window, min_history)
    assume(all(m > 1e-9 for _, _, m in expected))
    guard = SpikeGuard(sigma=sigma, window=window, min_history=min_history)
    for step, (v, (spike, threshold, _)) in enumerate(zip(values, expected, strict=True)):
        assert bool(guard(torch.tensor(v, dtype=torch.float64))) == spike, f"step {step}"
        judged = guard.last_threshold.item()
        assert judged == pytest.approx(threshold, rel=1e-9, abs=1e-9), f"step {step}"


def test_nonfinite_values_are_flagged_and_never_enter_the_window():
    guard = SpikeGuard(sigma=3.0, window=4, min_history=2)
    assert judge(guard, [NAN, INF, -INF]) == [True, True, True]
    # A fresh window: still nothing to judge against after three flagged values.
    assert guard.last_threshold.item() == INF
    judge(guard, [1.0, 1.2])
    assert guard.last_threshold.item() == INF
    judge(guard, [1.1])
    assert guard.last_threshold.item() == pytest.approx(1.1 + 3.0 * statistics.stdev([1.0, 1.2]))


def test_spikes_do_not_enter_the_window():
    guard = SpikeGuard(sigma=2.0, window=8, min_history=4)
    base = [1.0, 1.1, 0.9, 1.0]
    judge(guard, base)
    # Ten spikes in a row: each is judged against the same clean history.
    assert judge(guard, [50.0] * 10) == [True] * 10
    assert guard.last_threshold.item() == pytest.approx(
        statistics.fmean(base) + 2.0 * statistics.stdev(base), rel=1e-12
    )


def test_nothing_finite_is_flagged_before_min_history_values():
    guard = SpikeGuard(sigma=1.0, window=8, min_history=5)
    assert judge(guard, [1.0, 1.0, 1.0, 1.0, 1e9]) == [False] * 5


def test_spikes_are_recorded_with_step_value_and_threshold():
    guard = SpikeGuard(sigma=2.0, window=8, min_history=4)
    values = [1.0, 1.1, 0.9, 1.0, 5.0, 1.05, NAN]
    judge(guard, values)
    threshold = statistics.fmean(values[:4]) + 2.0 * statistics.stdev(values[:4])
    records = guard.spikes
    assert [(r.step, r.value) for r in records[:1]] == [(4, 5.0)]
    assert records[0].threshold == pytest.approx(threshold, rel=1e-12)
    assert records[1].step == 6 and math.isnan(records[1].value)
    assert guard.spike_count.item() == 2


def test_spike_records_survive_a_checkpoint():
    guard = SpikeGuard(sigma=4.0, window=64, min_history=32)
    values = loss_trace(seed=3)
    judge(guard, values[:200])
    resumed = SpikeGuard(sigma=4.0, window=64, min_history=32)
    resumed.load_state_dict(roundtrip(guard.state_dict()))
    assert len(resumed.spikes) > 0
    for a, b in zip(resumed.spikes, guard.spikes, strict=True):
        assert a.step == b.step and a.threshold == b.threshold
        assert a.value == b.value or (math.isnan(a.value) and math.isnan(b.value))


def test_resuming_from_a_state_dict_continues_bit_for_bit():
    values = loss_trace(seed=4)
    uninterrupted = SpikeGuard(sigma=4.0, window=64, min_history=32)
    flags = judge(uninterrupted, values)
    first = SpikeGuard(sigma=4.0, window=64, min_history=32)
    judge(first, values[:150])
    resumed = SpikeGuard(sigma=4.0, window=64, min_history=32)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert judge(resumed, values[150:]) == flags[150:]
    final_a, final_b = uninterrupted.state_dict()["state"], resumed.state_dict()["state"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=0, atol=0, equal_nan=True)


def test_only_the_last_max_records_spikes_are_kept_in_order():
    guard = SpikeGuard(window=4, min_history=2, max_records=3)
    judge(guard, [NAN] * 5)
    assert [r.step for r in guard.spikes] == [2, 3, 4]
    assert guard.spike_count.item() == 5


def test_guard_call_never_reads_the_device():
    guard = SpikeGuard(sigma=4.0, window=64, min_history=32)
    values = [torch.tensor(v) for v in loss_trace(seed=5)]
    with counted_host_reads() as reads:
        for value in values:
            guard(value)
    assert sum(reads.values()) == 0, dict(reads)


def test_guard_returns_a_bool_tensor_on_the_value_device():
    flag = SpikeGuard()(torch.tensor(1.0))
    assert flag.dtype == torch.bool and flag.shape == () and flag.device.type == "cpu"


def test_guard_accepts_python_floats():
    guard = SpikeGuard(window=4, min_history=2)
    assert [bool(guard(v)) for v in [1.0, 1.0, 1.0, 2.0]] == [False, False, False, True]


def test_spikes_of_a_fresh_guard_is_empty():
    assert SpikeGuard().spikes == []
    assert isinstance(SpikeRecord(1, 2.0, 3.0), tuple)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"metric": "accuracy"}, ValueError, "metric"),
        ({"metric": None}, TypeError, "metric"),
        ({"sigma": 0.0}, ValueError, "sigma"),
        ({"sigma": -6.0}, ValueError, "sigma"),
        ({"sigma": NAN}, ValueError, "sigma"),
        ({"window": 1}, ValueError, "window"),
        ({"window": 0}, ValueError, "window"),
        ({"window": 128.0}, TypeError, "window"),
        ({"min_history": 1}, ValueError, "min_history"),
        ({"min_history": 200}, ValueError, "min_history"),
        ({"max_records": 0}, ValueError, "max_records"),
        ({"process_group": "default"}, TypeError, "process_group"),
    ],
)
def test_bad_arguments_are_rejected_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpikeGuard(**kwargs)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (torch.ones(2), ValueError),
        (torch.tensor(True), TypeError),
        ("1.0", TypeError),
        (None, TypeError),
    ],
)
def test_bad_values_are_rejected(value, error):
    with pytest.raises(error, match="value"):
        SpikeGuard()(value)


def test_load_state_dict_rejects_a_different_window():
    guard = SpikeGuard(window=8, min_history=4)
    guard(1.0)
    with pytest.raises(ValueError, match="window"), pytest.warns(UserWarning):
        SpikeGuard(window=16, min_history=4).load_state_dict(guard.state_dict())


def test_a_flagged_spike_vetoes_the_loss_scaler_step_and_leaves_the_scale():
    from finite.scaling import LossScaler

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = LossScaler(init_scale=2.0**8)
    guard = SpikeGuard(sigma=3.0, window=8, min_history=4)
    x = torch.ones(4, 3)
    stepped = []
    for weight in [1.0, 1.0, 1.0, 1.0, 1.0, 50.0]:
        optimizer.zero_grad()
        loss = weight * (model(x) - 1.0).square().mean()
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        stepped.append(scaler.step(optimizer, veto=guard(loss)))
        scaler.update()
    assert stepped == [True] * 5 + [False]
    assert any(p.grad.abs().sum() > 0 for p in model.parameters()), "a step would move them"
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() == 2.0**8
