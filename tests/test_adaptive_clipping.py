"""ZClip, AutoClip and AGC against small re-statements of their papers' rules.

The references are written here in plain Python floats (ZClip), numpy.percentile
(AutoClip) and a float64 numpy computation per unit (AGC); the norm sequences are recorded
below, so every decision is checked step by step.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import finite.clipping.result as result_module
from finite.clipping.agc import AGC
from finite.clipping.autoclip import AutoClip
from finite.clipping.result import ClipResult
from finite.clipping.zclip import ZClip
from host_reads import counted_host_reads

NAN = math.nan
INF = math.inf
NORM_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard, which the references use


# ----------------------------------------------------------------------------- helpers


def single_gradient(value: float, dtype=torch.float32) -> torch.nn.Parameter:
    """A parameter whose gradient has the 2-norm ``|value|`` (one element)."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    param.grad = torch.tensor([value], dtype=dtype)
    return param


def float32_sequence(values) -> list[float]:
    """``values`` rounded to float32, the dtype the norms are computed in."""
    return [float(np.float32(v)) for v in values]


def recorded_norms(seed: int, steps: int = 120) -> list[float]:
    """A gradient-norm trace: a slow drift with noise and a few spikes of 3-30x."""
    rng = np.random.default_rng(seed)
    base = 0.4 * np.exp(np.linspace(0.0, -0.7, steps)) * rng.lognormal(0.0, 0.15, steps)
    spikes = rng.choice(np.arange(30, steps), size=8, replace=False)
    base[spikes] *= rng.uniform(3.0, 30.0, size=spikes.size)
    return float32_sequence(base)


def roundtrip(state_dict):
    """``state_dict`` through ``torch.save``/``torch.load``, as a checkpoint would take it."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------- ZClip reference
def zclip_rule(
    norms,
    alpha=0.97,
    z_thresh=2.5,
    max_grad_norm=1.0,
    eps=1e-6,
    warmup_steps=25,
    mode="zscore",
    clip_option="adaptive_scaling",
    clip_factor=1.0,
    skip_update_on_spike=False,
):
    """The ZClip paper's rule restated in Python floats: per step, the norm the gradients
    are scaled to (``None`` when not clipped) and the smallest relative distance of a
    decision from its tie (to rule out cases that float64 rounding order could flip)."""
    warmup, mean, var = [], None, None
    limits, margins = [], []
    for g in norms:
        cap = INF if max_grad_norm is None else max_grad_norm
        if mean is None:
            warmup.append(g)
            if len(warmup) == warmup_steps:
                mean = sum(warmup) / warmup_steps
                var = sum((x - mean) ** 2 for x in warmup) / warmup_steps
            limits.append(cap if g > cap else None)
            margins.append(abs(g - cap) / g)
            continue
        std = math.sqrt(var)
        target = None
        if mode == "percentile":
            bound = mean + z_thresh * std
            margins.append(abs(g - bound) / g)
            if g > bound:
                target = bound
        else:
            z = (g - mean) / (std + eps)
            margins.append(abs(z - z_thresh) / z_thresh)
            if z > z_thresh:
                if clip_option == "adaptive_scaling":
                    # The paper's eta = z / z_thresh divides the excess z_thresh * std.
                    target = clip_factor * (mean + z_thresh**2 * std / z)
                else:
                    target = mean
        limit = min(g if target is None else target, cap)
        margins[-1] = min(margins[-1], abs(g - limit) / g if limit != g else 1.0)
        limits.append(limit if g > limit else None)
        if target is not None and skip_update_on_spike:
            continue
        value = g if target is None else target
        mean = alpha * mean + (1 - alpha) * value
        var = alpha * var + (1 - alpha) * (value - mean) ** 2
    return limits, margins


def run_clipper(clipper, norms, dtype=torch.float32):
    """Feed ``norms`` (one gradient each) to ``clipper``; the results and clipped grads."""
    results, grads = [], []
    for g in norms:
        param = single_gradient(g, dtype)
        results.append(clipper([param]))
        grads.append(param.grad.clone())
    return results, grads


def assert_follows_limits(norms, results, grads, limits):
    steps = zip(norms, results, grads, limits, strict=True)
    for step, (g, result, grad, limit) in enumerate(steps):
        assert result.norm.item() == g, f"step {step}: the norm of a 1-element gradient is exact"
        assert bool(result.clipped) == (limit is not None), f"step {step}"
        if limit is None:
            assert grad.item() == g, f"step {step}: an unclipped gradient is untouched"
        else:
            assert result.threshold.item() == pytest.approx(limit, rel=1e-12), f"step {step}"
            expected = g * (limit / (g + NORM_EPS))
            assert grad.item() == pytest.approx(expected, rel=1e-6), f"step {step}"


ZCLIP_SETTINGS = [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile"},
    {"max_grad_norm": None},
    {"max_grad_norm": None, "skip_update_on_spike": True},
    {"max_grad_norm": 0.5, "clip_factor": 0.7, "z_thresh": 2.0, "alpha": 0.9},
    {"max_grad_norm": None, "mode": "percentile", "warmup_steps": 5, "z_thresh": 1.5},
]


@pytest.mark.parametrize("settings", ZCLIP_SETTINGS, ids=lambda s: repr(s) or "defaults")
@pytest.mark.parametrize("seed", [0, 1])
def test_zclip_decisions_match_the_restated_rule_on_recorded_norms(settings, seed):
    norms = recorded_norms(seed)
    limits, margins = zclip_rule(norms, **settings)
    assert min(margins) > 1e-9, "the recorded trace has no near-ties"
    assert sum(limit is not None for limit in limits) >= 3, "the trace exercises clipping"
    results, grads = run_clipper(ZClip(**settings), norms)
    assert_follows_limits(norms, results, grads, limits)


@given(
    norms=st.lists(st.floats(2.0**-10, 2.0**10, width=32), min_size=1, max_size=60),
    settings=st.sampled_from(ZCLIP_SETTINGS),
    warmup_steps=st.integers(1, 8),
)
def test_zclip_decisions_match_the_restated_rule_on_any_finite_sequence(
    norms, settings, warmup_steps
):
    settings = {**settings, "warmup_steps": warmup_steps}
    limits, margins = zclip_rule(norms, **settings)
    assume(min(margins) > 1e-9)
    results, grads = run_clipper(ZClip(**settings), norms)
    assert_follows_limits(norms, results, grads, limits)


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_grad_norm": None}, {"mode": "percentile", "max_grad_norm": None}],
    ids=repr,
)
def test_zclip_matches_the_reference_package(settings):
    zclip = pytest.importorskip("zclip")
    norms = recorded_norms(seed=2, steps=80)
    ours, theirs = ZClip(**settings), zclip.ZClip(**settings)
    model = torch.nn.Linear(1, 1, bias=False)
    for step, g in enumerate(norms):
        model.weight.grad = torch.tensor([[g]])
        reference = model.weight.grad
        theirs.step(model)
        param = single_gradient(g)
        ours([param])
        assert param.grad.item() == pytest.approx(reference.item(), rel=1e-6), f"step {step}"


def test_zclip_leaves_gradients_and_statistics_alone_on_a_nonfinite_norm():
    norms = recorded_norms(seed=3, steps=40)
    with_gap, without = ZClip(warmup_steps=5), ZClip(warmup_steps=5)
    for index, g in enumerate(norms):
        if index in (2, 20):  # once in warmup, once after
            for bad in (NAN, INF):
                param = single_gradient(bad)
                result = with_gap([param])
                assert not bool(result.clipped)
                torch.testing.assert_close(
                    param.grad, torch.tensor([bad]), rtol=0, atol=0, equal_nan=True
                )
        a, b = with_gap([single_gradient(g)]), without([single_gradient(g)])
        assert torch.equal(a.threshold, b.threshold) and torch.equal(a.clipped, b.clipped)


def test_zclip_resumes_bit_for_bit_from_a_state_dict():
    norms = recorded_norms(seed=4, steps=60)
    uninterrupted = ZClip(warmup_steps=10)
    expected, expected_grads = run_clipper(uninterrupted, norms)
    first = ZClip(warmup_steps=10)
    run_clipper(first, norms[:30])
    resumed = ZClip(warmup_steps=10)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    results, grads = run_clipper(resumed, norms[30:])
    for a, b, ga, gb in zip(expected[30:], results, expected_grads[30:], grads, strict=True):
        assert torch.equal(a.threshold, b.threshold) and torch.equal(a.clipped, b.clipped)
        assert torch.equal(ga, gb)


def test_zclip_load_state_dict_rejects_a_different_warmup_length():
    clipper = ZClip(warmup_steps=10)
    clipper([single_gradient(1.0)])
    with pytest.raises(ValueError, match="warmup_steps"), pytest.warns(UserWarning):
        ZClip(warmup_steps=5).load_state_dict(clipper.state_dict())


@pytest.fixture
def device_path(monkeypatch):
    """Take the path of gradients on a device (where reading a value waits for it) on the
    CPU, so that any host read can be counted."""
    monkeypatch.setattr(result_module, "host_reads_are_free", lambda tensors, flag: False)


def test_zclip_call_never_reads_the_device(device_path):
    norms = recorded_norms(seed=5, steps=40)
    clipper = ZClip(warmup_steps=5)
    params = [single_gradient(g) for g in norms]
    with counted_host_reads() as reads:
        for param in params:
            clipper([param])
    assert sum(reads.values()) == 0, dict(reads)


@pytest.mark.parametrize("make", [lambda: ZClip(warmup_steps=2), lambda: AutoClip(50.0)])
def test_on_the_cpu_an_unclipped_step_does_not_write_the_gradients(make):
    clipper = make()
    for g in (0.5, 0.5):  # ZClip: warmup below max_grad_norm; AutoClip: g == the median
        param = single_gradient(g)
        version = param.grad._version  # bumped by every in-place write
        assert not bool(clipper([param]).clipped)
        assert param.grad._version == version


def test_on_a_device_every_step_multiplies_the_gradients(device_path):
    param = single_gradient(0.5)
    version = param.grad._version
    assert not bool(ZClip()([param]).clipped)
    assert param.grad._version > version


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zclip_clips_half_precision_gradients_with_a_float32_norm(dtype):
    # 300 * sqrt(100) = 3000 squares to 9e6, beyond float16's range.
    param = torch.nn.Parameter(torch.zeros(100, dtype=dtype))
    param.grad = torch.full((100,), 300.0, dtype=dtype)
    result = ZClip(max_grad_norm=1.0)(param)
    assert result.norm.dtype == torch.float32
    assert result.norm.item() == pytest.approx(3000.0, rel=1e-6)
    expected = 300.0 * (1.0 / (3000.0 + NORM_EPS))
    expected_grads = torch.full((100,), expected, dtype=torch.float64)
    torch.testing.assert_close(param.grad.double(), expected_grads, rtol=2**-7, atol=0)


def test_zclip_accepts_a_module_and_returns_a_clip_result():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(4, 3)).sum().backward()
    result = ZClip()(model)
    assert isinstance(result, ClipResult)
    norm, threshold, clipped = result
    assert clipped.dtype == torch.bool and threshold.shape == ()
    # Gradient of sum(Wx + b): rows of 4s for W (2x3), 4s for b (2): sqrt(8 * 16).
    assert norm.item() == pytest.approx(math.sqrt(8 * 16.0), rel=1e-6)


def test_zclip_without_gradients_changes_nothing():
    clipper = ZClip(warmup_steps=2)
    before = clipper.state_dict()
    result = clipper([torch.nn.Parameter(torch.zeros(3))])
    assert result.norm.item() == 0.0 and not bool(result.clipped)
    assert clipper.state_dict()["state"]["warmup_count"].item() == 0
    assert before["state"] is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": 1.0}, ValueError, "alpha"),
        ({"alpha": NAN}, ValueError, "alpha"),
        ({"alpha": "0.9"}, TypeError, "alpha"),
        ({"z_thresh": 0.0}, ValueError, "z_thresh"),
        ({"z_thresh": -2.5}, ValueError, "z_thresh"),
        ({"z_thresh": INF}, ValueError, "z_thresh"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"warmup_steps": 0}, ValueError, "warmup_steps"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps"),
        ({"warmup_steps": True}, TypeError, "warmup_steps"),
        ({"mode": "zScore"}, ValueError, "mode"),
        ({"mode": None}, TypeError, "mode"),
        ({"clip_option": "median"}, ValueError, "clip_option"),
        ({"clip_factor": 0.0}, ValueError, "clip_factor"),
        ({"skip_update_on_spike": 1}, TypeError, "skip_update_on_spike"),
        ({"process_group": "default"}, TypeError, "process_group"),
    ],
)
def test_zclip_rejects_bad_arguments_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        ZClip(**kwargs)


# ----------------------------------------------------------------------------- AutoClip
def autoclip_rule(norms, percentile, history):
    """Seetharaman et al.'s rule: append the norm, clip at numpy's percentile of the
    history; the per-step threshold (non-finite norms are left out of the history)."""
    kept, thresholds = [], []
    for g in norms:
        if math.isfinite(g):
            kept.append(g)
        window = kept if history is None else kept[-history:]
        thresholds.append(float(np.percentile(window, percentile)) if window else INF)
    return thresholds


@given(
    norms=st.lists(
        st.floats(2.0**-10, 2.0**10, width=32) | st.sampled_from([NAN, INF]),
        min_size=1,
        max_size=150,
    ),
    percentile=st.floats(0.0, 100.0, exclude_min=True) | st.sampled_from([10.0, 50.0, 100.0]),
    history=st.none() | st.integers(1, 20),
)
def test_autoclip_clips_at_numpy_percentile_of_the_history(norms, percentile, history):
    thresholds = autoclip_rule(norms, percentile, history)
    results, grads = run_clipper(AutoClip(percentile, history), norms)
    for step, (g, threshold, result, grad) in enumerate(
        zip(norms, thresholds, results, grads, strict=True)
    ):
        assert result.threshold.item() == pytest.approx(threshold, rel=1e-12), f"step {step}"
        clipped = math.isfinite(g) and g > threshold
        assert bool(result.clipped) == clipped, f"step {step}"
        expected = g * (threshold / (g + NORM_EPS)) if clipped else g
        assert grad.item() == pytest.approx(expected, rel=1e-6, nan_ok=True), f"step {step}"


def test_autoclip_with_history_forgets_old_norms():
    # Norms 100, then 1s: with a window of 3 the 100 leaves after three more steps.
    norms = [100.0, 1.0, 1.0, 1.0, 1.0]
    results, _ = run_clipper(AutoClip(percentile=100.0, history=3), norms)
    assert [r.threshold.item() for r in results] == [100.0, 100.0, 100.0, 1.0, 1.0]


@pytest.mark.parametrize("history", [None, 7])
def test_autoclip_resumes_bit_for_bit_from_a_state_dict(history):
    # 150 norms: the growing buffer (64 entries at first) doubles twice.
    norms = recorded_norms(seed=6, steps=150)
    expected, _ = run_clipper(AutoClip(25.0, history), norms)
    first = AutoClip(25.0, history)
    run_clipper(first, norms[:70])
    resumed = AutoClip(25.0, history)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    results, _ = run_clipper(resumed, norms[70:])
    for a, b in zip(expected[70:], results, strict=True):
        assert torch.equal(a.threshold, b.threshold) and torch.equal(a.clipped, b.clipped)


def test_autoclip_call_never_reads_the_device(device_path):
    params = [single_gradient(g) for g in recorded_norms(seed=7, steps=130)]
    clipper = AutoClip(10.0)
    with counted_host_reads() as reads:
        for param in params:
            clipper([param])
    assert sum(reads.values()) == 0, dict(reads)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"percentile": 0.0}, ValueError, "percentile"),
        ({"percentile": -5.0}, ValueError, "percentile"),
        ({"percentile": 100.5}, ValueError, "percentile"),
        ({"percentile": NAN}, ValueError, "percentile"),
        ({"percentile": "10"}, TypeError, "percentile"),
        ({"history": 0}, ValueError, "history"),
        ({"history": 2.0}, TypeError, "history"),
    ],
)
def test_autoclip_rejects_bad_arguments_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoClip(**kwargs)


# ----------------------------------------------------------------------------- AGC
def agc_reference(param: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float):
    """Brock et al.'s unit-wise rule in float64 numpy: units are slices along the first
    dimension, scalars and vectors one unit; returns the clipped gradient and the ratios."""
    w = param.detach().double().numpy()
    g = grad.detach().double().numpy()
    rows = (w.reshape(w.shape[0], -1), g.reshape(g.shape[0], -1)) if w.ndim >= 2 else None
    if rows is None:
        w_norms = np.array([math.sqrt(math.fsum(x * x for x in w.ravel()))])
        g_norms = np.array([math.sqrt(math.fsum(x * x for x in g.ravel()))])
        g_units = g.reshape(1, -1)
    else:
        w_norms = np.array([math.sqrt(math.fsum(x * x for x in row)) for row in rows[0]])
        g_norms = np.array([math.sqrt(math.fsum(x * x for x in row)) for row in rows[1]])
        g_units = rows[1]
    out = g_units.copy()
    for i, (wn, gn) in enumerate(zip(w_norms, g_norms, strict=True)):
        limit = clipping * max(wn, eps)
        if gn > limit:
            out[i] = g_units[i] * (limit / max(gn, 1e-6))
    ratios = g_norms / np.maximum(w_norms, eps)
    return out.reshape(g.shape), ratios


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.LayerNorm(4)
        self.hidden = torch.nn.Linear(4, 6)
        self.fc = torch.nn.Linear(6, 5)


def net_with_gradients(seed: int, dtype=torch.float32) -> SmallNet:
    """A network whose gradients span 1e-4 to 1e-1 of the weights, unit by unit."""
    generator = torch.Generator().manual_seed(seed)
    net = SmallNet().to(dtype)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
            units = param.shape[0] if param.ndim >= 2 else 1
            shape = (units,) + (1,) * (param.ndim - 1) if param.ndim >= 2 else ()
            scale = 10.0 ** (-1 - 3 * torch.rand(shape, generator=generator))
            param.grad = (torch.randn(param.shape, generator=generator) * scale).to(dtype)
    return net


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clipping", [0.01, 0.05])
def test_agc_matches_a_float64_per_unit_reference(seed, clipping):
    net = net_with_gradients(seed)
    expected = {n: agc_reference(p, p.grad, clipping, 1e-3) for n, p in net.named_parameters()}
    result = AGC(clipping=clipping)(net)
    for name, param in net.named_parameters():
        clipped, _ = expected[name]
        np.testing.assert_allclose(param.grad.double().numpy(), clipped, rtol=1e-5, atol=0)
    largest = max(ratios.max() for _, ratios in expected.values())
    assert result.norm.item() == pytest.approx(largest, rel=1e-5)
    assert result.threshold.item() == pytest.approx(clipping)
    assert bool(result.clipped) == (largest > clipping)


def test_agc_clips_some_units_and_keeps_others_in_the_same_tensor():
    net = net_with_gradients(seed=0)
    before = net.hidden.weight.grad.clone()
    _, ratios = agc_reference(net.hidden.weight, before, 0.01, 1e-3)
    assert (ratios > 0.01).any() and (ratios <= 0.01).any(), "the setup mixes both"
    AGC(clipping=0.01)(net)
    for row, ratio in enumerate(ratios):
        assert torch.equal(net.hidden.weight.grad[row], before[row]) == (ratio <= 0.01)


def test_agc_treats_a_bias_as_one_unit():
    bias = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5: limit 0.05
    bias.grad = torch.tensor([0.06, 0.0])  # per element, 0.06 > 0.01 * 3; as a unit, 0.06 > 0.05
    AGC(clipping=0.01)([("bias", bias)])
    torch.testing.assert_close(bias.grad, torch.tensor([0.05, 0.0]), rtol=1e-6, atol=0)


def test_agc_floors_the_weight_norm_at_eps_for_zero_initialised_units():
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    weight.grad = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1e-6]])
    AGC(clipping=0.01, eps=1e-3)([weight])
    # limit = 0.01 * 1e-3 = 1e-5: the first row is scaled to it, the second is below it.
    expected = torch.tensor([[1e-5 / 1.0, 0.0, 0.0], [0.0, 0.0, 1e-6]])
    torch.testing.assert_close(weight.grad, expected, rtol=1e-6, atol=0)


def test_agc_leaves_excluded_parameters_and_modules_untouched():
    net = net_with_gradients(seed=1)
    fc_before = [p.grad.clone() for p in net.fc.parameters()]
    norm_weight_before = net.norm.weight.grad.clone()
    hidden_before = net.hidden.weight.grad.clone()
    AGC(clipping=1e-4, exclude=("fc", "norm.weight"))(net.named_parameters())
    assert all(torch.equal(p.grad, b) for p, b in zip(net.fc.parameters(), fc_before, strict=True))
    assert torch.equal(net.norm.weight.grad, norm_weight_before)
    assert not torch.equal(net.hidden.weight.grad, hidden_before)


def test_agc_exclude_does_not_match_a_name_that_only_shares_a_prefix():
    net = torch.nn.ModuleDict({"fc": torch.nn.Linear(2, 2), "fc2": torch.nn.Linear(2, 2)})
    for param in net.parameters():
        param.grad = torch.ones_like(param)
    before = net["fc2"].weight.grad.clone()
    AGC(clipping=1e-4, exclude=("fc",))(net)
    assert not torch.equal(net["fc2"].weight.grad, before)


def test_agc_rejects_exclude_names_that_match_no_parameter():
    net = SmallNet()
    with pytest.raises(ValueError, match="classifier"):
        AGC(exclude=("classifier",))(net)


def test_agc_rejects_exclude_with_unnamed_parameters():
    net = SmallNet()
    with pytest.raises(ValueError, match="named_parameters"):
        AGC(exclude=("fc",))(net.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_agc_clips_half_precision_gradients_with_float32_norms(dtype):
    # Row norms of 300 * sqrt(64) = 2400 square to 5.8e6, beyond float16's range.
    weight = torch.nn.Parameter(torch.full((2, 64), 1000.0, dtype=dtype))
    weight.grad = torch.full((2, 64), 300.0, dtype=dtype)
    result = AGC(clipping=0.01)([weight])
    limit = 0.01 * 1000.0 * 8.0
    expected = torch.full((2, 64), 300.0 * limit / 2400.0, dtype=torch.float64)
    torch.testing.assert_close(weight.grad.double(), expected, rtol=2**-7, atol=0)
    assert result.norm.item() == pytest.approx(2400.0 / 8000.0, rel=1e-6)


def test_agc_reports_nan_for_a_nan_gradient_and_leaves_it():
    weight = torch.nn.Parameter(torch.ones(2, 2))
    weight.grad = torch.tensor([[NAN, 0.0], [0.001, 0.0]])
    result = AGC()([weight])
    assert math.isnan(result.norm.item())
    assert torch.equal(weight.grad[1], torch.tensor([0.001, 0.0]))


def test_agc_call_never_reads_the_device():
    net = net_with_gradients(seed=2)
    agc = AGC(exclude=("fc",))
    with counted_host_reads() as reads:
        agc(net)
    assert sum(reads.values()) == 0, dict(reads)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clipping": 0.0}, ValueError, "clipping"),
        ({"clipping": -0.01}, ValueError, "clipping"),
        ({"clipping": INF}, ValueError, "clipping"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": None}, TypeError, "eps"),
        ({"exclude": "fc"}, TypeError, "exclude"),
        ({"exclude": ("fc", 3)}, TypeError, "exclude"),
    ],
)
def test_agc_rejects_bad_arguments_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        AGC(**kwargs)


def test_clippers_are_not_changed_by_copying_their_state_dict():
    clipper = ZClip(warmup_steps=2)
    run_clipper(clipper, [1.0, 2.0, 3.0])
    saved = copy.deepcopy(clipper.state_dict())
    clipper.state_dict()["state"]["mean"].fill_(123.0)
    assert torch.equal(clipper.state_dict()["state"]["mean"], saved["state"]["mean"])
