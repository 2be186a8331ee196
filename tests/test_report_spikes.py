"""loss_spikes: the spikes the report marks are the ones SpikeGuard would flag."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finite.clipping import SpikeGuard
from finite.report import loss_spikes


def noisy_decreasing_loss(seed: int, steps: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    trend = 2.0 * np.exp(-np.arange(steps) / 120.0) + 0.3
    return trend * (1.0 + 0.05 * rng.standard_normal(steps))


@pytest.mark.parametrize("seed", range(4))
def test_flags_match_spike_guard_on_a_series_with_planted_spikes(seed):
    loss = noisy_decreasing_loss(seed)
    rng = np.random.default_rng(100 + seed)
    for i in rng.choice(np.arange(40, 300), size=5, replace=False):
        loss[i] *= rng.uniform(1.5, 20.0)
    guard = SpikeGuard(sigma=6.0, window=32, min_history=16)
    expected = [bool(guard(torch.tensor(v, dtype=torch.float64))) for v in loss]
    flags = loss_spikes(loss, sigma=6.0, window=32, min_history=16)
    assert flags.tolist() == expected
    assert flags.any()  # the planted spikes are big enough to be seen


def test_a_planted_spike_is_flagged_at_its_step():
    loss = noisy_decreasing_loss(0)
    loss[150] = 10.0 * loss[149]
    assert np.flatnonzero(loss_spikes(loss)).tolist() == [150]


def test_a_healthy_noisy_run_has_no_spikes():
    assert not loss_spikes(noisy_decreasing_loss(1)).any()


def test_spikes_stay_out_of_the_history_so_a_run_of_them_is_flagged_whole():
    loss = np.concatenate([np.full(20, 1.0) + 0.01 * np.sin(np.arange(20)), [50.0] * 5])
    assert loss_spikes(loss)[20:].all()


def test_nothing_is_flagged_before_min_history_values():
    loss = np.array([1.0, 1.01, 0.99, 100.0])
    assert not loss_spikes(loss, min_history=4).any()
    assert loss_spikes(loss, min_history=3).tolist() == [False, False, False, True]


@given(
    st.lists(st.floats(0.1, 10.0), min_size=1, max_size=60),
    st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=1, max_size=5),
    st.randoms(use_true_random=False),
)
def test_nonfinite_values_are_never_flagged_and_change_no_other_flag(values, bad, random):
    with_bad = list(values)
    for value in bad:
        with_bad.insert(random.randrange(len(with_bad) + 1), value)
    flags = loss_spikes(np.array(with_bad), min_history=2, window=8)
    finite = np.isfinite(with_bad)
    assert not flags[~finite].any()
    assert flags[finite].tolist() == loss_spikes(np.array(values), min_history=2, window=8).tolist()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss": np.ones((2, 2))}, ValueError, "loss must be 1-d"),
        ({"sigma": 0.0}, ValueError, "sigma must be finite and > 0, got 0.0"),
        ({"sigma": "6"}, TypeError, "sigma must be a number, got str"),
        ({"window": 1}, ValueError, "window must be >= 2, got 1"),
        ({"window": 4.0}, TypeError, "window must be an int, got float"),
        ({"min_history": 200}, ValueError, "min_history must be in \\[2, window=128\\], got 200"),
    ],
)
def test_bad_arguments_are_named_in_the_error(kwargs, error, match):
    arguments = {"loss": np.ones(5), **kwargs}
    with pytest.raises(error, match=match):
        loss_spikes(arguments.pop("loss"), **arguments)
