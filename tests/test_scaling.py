"""Specification of finite.scaling.LossScaler.

References are independent of the code under test: torch.amp.GradScaler run side by side,
DeepSpeed's hysteresis rule re-stated in plain Python, exact rational arithmetic for the
headroom scale, and float32 training without scaling (power-of-two scales are exact).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finite.scaling import LossScaler, OverflowReport, ScaleRecord

INF = float("inf")
NAN = float("nan")
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
WIDE_BOUNDS = {"min_scale": 2.0**-100, "max_scale": 2.0**100}


def f32(x: float) -> float:
    return float(np.float32(x))


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)


def mse(model: torch.nn.Module, seed: int) -> torch.Tensor:
    x, y = batch(seed)
    return (model(x) - y).square().mean()


def drive(scaler, optimizer, param: torch.nn.Parameter, overflow: bool) -> bool:
    """One iteration whose gradient is ``scale * 1`` or inf."""
    scaled_ones = scaler.scale(torch.ones_like(param))
    param.grad = torch.full_like(param, INF) if overflow else scaled_ones
    stepped = scaler.step(optimizer)
    scaler.update()
    return stepped


def single_param_setup(scaler_kwargs=None, device="cpu"):
    param = torch.nn.Parameter(torch.zeros(3, device=device))
    optimizer = torch.optim.SGD([param], lr=0.1)
    return param, optimizer, LossScaler(**(scaler_kwargs or {}))


def params_and_state(model, optimizer):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(
        optimizer.state_dict()
    )


def assert_bitwise_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bitwise_equal(x, y)
    else:
        assert a == b


# ----------------------------------------------------------------- configuration


def test_defaults_are_the_documented_ones():
    config = LossScaler().config
    assert (config.init_scale, config.growth_factor, config.backoff_factor) == (2.0**16, 2.0, 0.5)
    assert (config.growth_interval, config.hysteresis, config.patience) == (2000, 1, 10)
    assert (config.min_scale, config.max_scale, config.margin_bits) == (1.0, 2.0**24, 4)
    assert (config.strategy, config.on_min_scale) == ("backoff", "raise")
    assert config.dynamic and config.enabled and LossScaler().process_group is None


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"growth_factor": 1.0}, ValueError, "growth_factor"),
        ({"growth_factor": INF}, ValueError, "growth_factor"),
        ({"growth_factor": "2"}, TypeError, "growth_factor"),
        ({"backoff_factor": 0.0}, ValueError, "backoff_factor"),
        ({"backoff_factor": 1.0}, ValueError, "backoff_factor"),
        ({"backoff_factor": NAN}, ValueError, "backoff_factor"),
        ({"backoff_factor": True}, TypeError, "backoff_factor"),
        ({"growth_interval": 0}, ValueError, "growth_interval"),
        ({"growth_interval": 2.0}, TypeError, "growth_interval"),
        ({"hysteresis": 0}, ValueError, "hysteresis"),
        ({"hysteresis": True}, TypeError, "hysteresis"),
        ({"init_scale": 0.0}, ValueError, "init_scale"),
        ({"init_scale": -4.0}, ValueError, "init_scale"),
        ({"init_scale": INF}, ValueError, "init_scale"),
        ({"init_scale": torch.tensor(2.0)}, TypeError, "init_scale"),
        ({"min_scale": 1e-50}, ValueError, "min_scale"),
        ({"max_scale": 1e39}, ValueError, "max_scale"),
        ({"init_scale": 0.5}, ValueError, "min_scale <= init_scale"),
        ({"init_scale": 2.0**30}, ValueError, "init_scale <= max_scale"),
        ({"strategy": "grow"}, ValueError, "strategy"),
        ({"strategy": None}, TypeError, "strategy"),
        ({"on_min_scale": "ignore"}, ValueError, "on_min_scale"),
        ({"margin_bits": -1}, ValueError, "margin_bits"),
        ({"margin_bits": 1.5}, TypeError, "margin_bits"),
        ({"patience": 0}, ValueError, "patience"),
        ({"history_size": -1}, ValueError, "history_size"),
        ({"dynamic": 1}, TypeError, "dynamic"),
        ({"enabled": "yes"}, TypeError, "enabled"),
        ({"strategy": "headroom", "dynamic": False}, ValueError, "headroom"),
        ({"process_group": "world"}, ValueError, "process_group"),
        ({"process_group": 3}, TypeError, "process_group"),
    ],
)
def test_bad_argument_raises_naming_it(kwargs, error, name):
    with pytest.raises(error, match=name):
        LossScaler(**kwargs)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_growth_factor_is_accepted_exactly_when_finite_and_above_one(value):
    if math.isfinite(value) and value > 1:
        assert LossScaler(growth_factor=value).config.growth_factor == value
    else:
        with pytest.raises(ValueError, match="growth_factor"):
            LossScaler(growth_factor=value)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_backoff_factor_is_accepted_exactly_inside_the_open_unit_interval(value):
    if 0 < value < 1:
        assert LossScaler(backoff_factor=value).config.backoff_factor == value
    else:
        with pytest.raises(ValueError, match="backoff_factor"):
            LossScaler(backoff_factor=value)


def test_configuration_is_immutable():
    scaler = LossScaler()
    with pytest.raises(dataclasses.FrozenInstanceError):
        scaler.config.growth_factor = 4.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        scaler.config = None  # type: ignore[misc]


def test_scale_bounds_are_held_in_float32():
    config = LossScaler(init_scale=1000.1, min_scale=0.1).config
    assert config.init_scale == f32(1000.1) and config.min_scale == f32(0.1)


# ----------------------------------------------------------------- scale()


def test_scale_multiplies_the_loss_by_the_scale():
    loss = torch.tensor([1.5, -3.25], dtype=torch.float64)
    scaled = LossScaler(init_scale=1000.0).scale(loss)
    assert torch.equal(scaled, torch.tensor([1500.0, -3250.0], dtype=torch.float64))


def test_scale_applies_to_nested_lists_and_tuples():
    scaler = LossScaler(init_scale=4.0)
    a, b, c = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    scaled = scaler.scale([a, (b, c)])
    assert isinstance(scaled, list) and isinstance(scaled[1], tuple)
    assert [scaled[0].item(), scaled[1][0].item(), scaled[1][1].item()] == [4.0, 8.0, 12.0]


@pytest.mark.parametrize("loss", [torch.tensor(1), torch.tensor(True), 1.0, "loss"])
def test_scale_rejects_what_is_not_a_float_tensor(loss):
    with pytest.raises(TypeError, match="loss"):
        LossScaler().scale(loss)


def test_state_lives_on_the_device_of_the_first_loss():
    scaler = LossScaler()
    assert scaler.scale_tensor is None
    scaler.scale(torch.ones((), dtype=torch.float64))
    assert scaler.scale_tensor.device.type == "cpu" and scaler.scale_tensor.dtype == torch.float32


def test_disabled_scaler_is_a_pass_through():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(enabled=False)
    loss = mse(model, 0)
    assert scaler.scale(loss) is loss
    loss.backward()
    model[0].weight.grad[0, 0] = INF  # a disabled scaler does not look at gradients
    before = model[0].bias.detach().clone()
    assert scaler.step(optimizer) is True
    scaler.update()
    assert not torch.equal(model[0].bias, before)
    assert scaler.get_scale() == 1.0 and scaler.state_dict() == {} and scaler.scale_tensor is None


# ----------------------------------------------------------------- unscale_() and step()


def test_finite_step_equals_the_unscaled_float32_step_bitwise():
    reference, model = small_model(), small_model()
    reference_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = LossScaler(init_scale=2.0**12)
    for seed in range(3):
        reference_opt.zero_grad()
        mse(reference, seed).backward()
        reference_opt.step()
        optimizer.zero_grad()
        scaler.scale(mse(model, seed)).backward()
        assert scaler.step(optimizer)
        scaler.update()
    assert_bitwise_equal(list(reference.parameters()), list(model.parameters()))


def test_unscale_divides_gradients_by_the_scale():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = LossScaler(init_scale=3.0)
    scaled = torch.tensor([3.0, -6.0, 1.0, 1e-30])
    param.grad = scaled.clone()
    scaler.unscale_(optimizer)
    expected = (scaled.double() / 3.0).float()  # one correctly rounded division
    assert torch.allclose(param.grad, expected, rtol=2**-23, atol=0)


def test_unscale_twice_in_one_iteration_raises():
    param, optimizer, scaler = single_param_setup()
    param.grad = torch.ones(3)
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(optimizer)


def test_unscale_after_step_raises():
    param, optimizer, scaler = single_param_setup()
    param.grad = torch.ones(3)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(optimizer)


def test_step_twice_in_one_iteration_raises():
    param, optimizer, scaler = single_param_setup()
    param.grad = torch.ones(3)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.step(optimizer)


def test_explicit_unscale_then_step_unscales_once():
    param, optimizer, scaler = single_param_setup({"init_scale": 8.0})
    param.grad = torch.full((3,), 8.0)
    scaler.unscale_(optimizer)
    assert scaler.step(optimizer)
    assert torch.equal(param.detach(), torch.full((3,), -0.1))


def test_step_with_closure_raises():
    param, optimizer, scaler = single_param_setup()
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="closure"):
        scaler.step(optimizer, closure=lambda: None)


def test_step_rejects_what_is_not_an_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        LossScaler().step(object())


@pytest.mark.parametrize(
    ("dtype", "advice"), [(torch.float16, "MasterWeights"), (torch.bfloat16, "enabled=False")]
)
def test_half_precision_gradients_raise_pointing_at_master_weights(dtype, advice):
    param = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    param.grad = torch.ones(3, dtype=dtype)
    with pytest.raises(TypeError, match=advice) as error:
        LossScaler().unscale_(torch.optim.SGD([param], lr=0.1))
    assert str(dtype) in str(error.value) and "MasterWeights" in str(error.value)


def test_rejected_unscale_leaves_no_half_finished_iteration():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    param.grad = torch.ones(3, dtype=torch.float16)
    scaler = LossScaler()
    with pytest.raises(TypeError):
        scaler.step(torch.optim.SGD([param], lr=0.1))
    assert scaler.state_dict()["step"] == 0


def test_unscale_without_gradients_before_any_scale_raises():
    _, optimizer, scaler = single_param_setup()
    with pytest.raises(RuntimeError, match="no gradients"):
        scaler.unscale_(optimizer)


def test_optimizer_without_gradients_steps_once_the_scale_exists():
    param, optimizer, scaler = single_param_setup()
    scaler.scale(torch.ones(()))
    assert scaler.step(optimizer)
    scaler.update()
    assert torch.equal(param.detach(), torch.zeros(3))


def test_sparse_gradients_with_duplicate_indices_are_summed_then_unscaled():
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(6, 3, sparse=True)
    dense = torch.nn.Embedding(6, 3)
    dense.weight.data.copy_(sparse.weight.data)
    indices = torch.tensor([1, 4, 1, 1])
    scaler = LossScaler(init_scale=2.0**8)
    scaler.scale(sparse(indices).sum()).backward()
    dense(indices).sum().backward()
    scaler.unscale_(torch.optim.SGD(sparse.parameters(), lr=0.1))
    assert sparse.weight.grad.is_sparse and sparse.weight.grad.is_coalesced()
    assert torch.equal(sparse.weight.grad.to_dense(), dense.weight.grad)


def test_inf_in_a_sparse_gradient_skips_the_step():
    sparse = torch.nn.Embedding(6, 3, sparse=True)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    before = sparse.weight.detach().clone()
    scaler = LossScaler()
    (scaler.scale(sparse(torch.tensor([2, 3])).sum()) * INF).backward()
    assert scaler.step(optimizer) is False
    assert torch.equal(sparse.weight, before)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    ],
    ids=["sgd-nesterov", "adam", "adamw-amsgrad"],
)
@pytest.mark.parametrize("poison", [INF, -INF, NAN])
def test_skipped_step_leaves_parameters_and_optimizer_state_bit_identical(make_optimizer, poison):
    model = small_model()
    optimizer = make_optimizer(model.parameters())
    scaler = LossScaler(init_scale=2.0**10)
    for seed in range(2):  # build momentum / moment estimates first
        optimizer.zero_grad()
        scaler.scale(mse(model, seed)).backward()
        scaler.step(optimizer)
        scaler.update()
    before = params_and_state(model, optimizer)
    optimizer.zero_grad()
    scaler.scale(mse(model, 7)).backward()
    model[2].bias.grad[1] = poison
    assert scaler.step(optimizer) is False
    scaler.update()
    assert_bitwise_equal(before, params_and_state(model, optimizer))


class _CountingSyncs:
    """Counts host synchronisations requested from Python (item/tolist/bool/float/int)."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, original))

    def _counted(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return wrapper


@pytest.mark.parametrize("strategy", ["backoff", "headroom"])
def test_scale_unscale_and_update_never_sync_and_step_syncs_once(monkeypatch, strategy):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(strategy=strategy, hysteresis=2)
    loss = mse(model, 0)
    syncs = _CountingSyncs(monkeypatch)
    scaled = scaler.scale(loss)
    scaled.backward()
    scaler.unscale_(optimizer)
    assert syncs.calls == []
    optimizer_step = optimizer.step
    optimizer.step = lambda *a, **k: (syncs.calls.append("optimizer.step"), optimizer_step())
    scaler.step(optimizer)
    assert syncs.calls == ["tolist", "optimizer.step"]
    scaler.update()
    assert syncs.calls == ["tolist", "optimizer.step"]


# ----------------------------------------------------------------- the scale sequence


@given(
    pattern=st.lists(st.booleans(), max_size=40),
    init_scale=st.floats(1.0, 1e6),
    growth_factor=st.floats(1.01, 4.0),
    backoff_factor=st.floats(0.25, 0.99),
    growth_interval=st.integers(1, 5),
)
def test_scale_sequence_equals_grad_scaler(
    pattern, init_scale, growth_factor, backoff_factor, growth_interval
):
    factors = {
        "init_scale": init_scale,
        "growth_factor": growth_factor,
        "backoff_factor": backoff_factor,
        "growth_interval": growth_interval,
    }
    reference = torch.amp.GradScaler("cpu", **factors)
    ref_param, ref_optimizer, _ = single_param_setup()
    param, optimizer, scaler = single_param_setup({**factors, **WIDE_BOUNDS})
    for overflow in pattern:
        before = ref_param.detach().clone()
        drive(reference, ref_optimizer, ref_param, overflow)
        reference_stepped = not torch.equal(before, ref_param)
        assert drive(scaler, optimizer, param, overflow) == reference_stepped
        assert scaler.get_scale() == reference.get_scale()
    assert torch.equal(param, ref_param)


def deepspeed_scales(pattern, init, growth, backoff, interval, hysteresis, low, high):
    """DeepSpeed DynamicLossScaler.update_scale with consecutive_hysteresis=True, restated.

    Separate growth/backoff factors and the [low, high] clamp are LossScaler's extensions;
    products are taken in float64 and rounded to float32 like the float32 scale tensor.
    """
    scale, left, last_overflow = f32(init), hysteresis, -1
    for iteration, overflow in enumerate(pattern):
        if overflow:
            if hysteresis == 1 or left == 1:
                scale = f32(max(scale * backoff, low))
            else:
                left -= 1
            last_overflow = iteration
        else:
            left = hysteresis
            if (iteration - last_overflow) % interval == 0:
                scale = f32(min(scale * growth, high))
        yield scale


@given(
    pattern=st.lists(st.booleans(), max_size=40),
    hysteresis=st.integers(1, 4),
    growth_interval=st.integers(1, 4),
    bounds=st.tuples(st.integers(-8, 16), st.integers(0, 24)),
)
def test_hysteresis_and_bounds_follow_the_deepspeed_rule(
    pattern, hysteresis, growth_interval, bounds
):
    low, high = 2.0 ** min(bounds), 2.0 ** max(bounds)
    init = min(max(2.0**10, low), high)
    kwargs = {
        "init_scale": init,
        "growth_interval": growth_interval,
        "hysteresis": hysteresis,
        "min_scale": low,
        "max_scale": high,
        "on_min_scale": "warn",
    }
    param, optimizer, scaler = single_param_setup(kwargs)
    expected = deepspeed_scales(pattern, init, 2.0, 0.5, growth_interval, hysteresis, low, high)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for overflow, reference in zip(pattern, expected, strict=True):
            drive(scaler, optimizer, param, overflow)
            assert scaler.get_scale() == reference


def test_hysteresis_holds_the_scale_for_the_first_k_minus_1_consecutive_overflows():
    param, optimizer, scaler = single_param_setup({"hysteresis": 3, "init_scale": 2.0**10})
    scales = []
    for _ in range(4):
        assert drive(scaler, optimizer, param, overflow=True) is False
        scales.append(scaler.get_scale())
    assert scales == [2.0**10, 2.0**10, 2.0**9, 2.0**8]


def test_a_finite_step_resets_the_hysteresis_counter():
    param, optimizer, scaler = single_param_setup({"hysteresis": 2, "init_scale": 2.0**10})
    for overflow in (True, False, True, False, True):
        drive(scaler, optimizer, param, overflow)
    assert scaler.get_scale() == 2.0**10


def test_scale_grows_up_to_max_scale_and_stays():
    param, optimizer, scaler = single_param_setup(
        {"init_scale": 2.0**20, "growth_interval": 1, "max_scale": 3.0 * 2**20}
    )
    for _ in range(3):
        drive(scaler, optimizer, param, overflow=False)
    assert scaler.get_scale() == 3.0 * 2**20


def test_scale_cannot_collapse_below_min_scale():
    param, optimizer, scaler = single_param_setup(
        {"init_scale": 8.0, "min_scale": 3.0, "patience": 100}
    )
    for _ in range(20):
        drive(scaler, optimizer, param, overflow=True)
    assert scaler.get_scale() == 3.0


def test_static_scale_stays_constant_and_still_skips():
    param, optimizer, scaler = single_param_setup(
        {"init_scale": 2.0**8, "dynamic": False, "growth_interval": 1}
    )
    results = [drive(scaler, optimizer, param, overflow) for overflow in (True, False, False)]
    assert results == [False, True, True]
    assert scaler.get_scale() == 2.0**8 and scaler.skipped_steps == 1


# ----------------------------------------------------------------- minimum scale


def named_setup(**scaler_kwargs):
    model = small_model()
    optimizer = torch.optim.SGD(model.named_parameters(), lr=0.1)
    return model, optimizer, LossScaler(**scaler_kwargs)


def overflow_in_first_layer(model, optimizer, scaler, seed=0):
    optimizer.zero_grad()
    scaler.scale(mse(model, seed)).backward()
    model[0].weight.grad[0, :2] = INF
    return scaler.step(optimizer)


def test_persistent_overflow_at_min_scale_raises_naming_parameter_and_cause():
    model, optimizer, scaler = named_setup(init_scale=4.0, min_scale=1.0, patience=3)
    # 4 -> 2 -> 1 takes two overflows; the next three sit at the minimum.
    for _ in range(4):
        overflow_in_first_layer(model, optimizer, scaler)
        scaler.update()
    with pytest.raises(FloatingPointError) as error:
        overflow_in_first_layer(model, optimizer, scaler)
    message = str(error.value)
    assert "0.weight (2 inf, 0 nan)" in message
    assert "bfloat16" in message and "float32" in message and "65504" in message


def test_warn_mode_warns_once_and_keeps_skipping():
    model, optimizer, scaler = named_setup(
        init_scale=1.0, min_scale=1.0, patience=2, on_min_scale="warn"
    )
    with pytest.warns(RuntimeWarning, match=r"0\.weight") as record:
        for _ in range(5):
            assert overflow_in_first_layer(model, optimizer, scaler) is False
            scaler.update()
    assert len([w for w in record if w.category is RuntimeWarning]) == 1
    assert scaler.skipped_steps == 5


def test_a_finite_step_resets_the_overflow_streak_at_min_scale():
    model, optimizer, scaler = named_setup(init_scale=1.0, min_scale=1.0, patience=2)
    for _ in range(4):
        overflow_in_first_layer(model, optimizer, scaler)
        scaler.update()
        optimizer.zero_grad()
        scaler.scale(mse(model, 1)).backward()
        assert scaler.step(optimizer)
        scaler.update()


def test_static_scaler_gives_up_at_its_constant_scale():
    model, optimizer, scaler = named_setup(init_scale=2.0**8, dynamic=False, patience=2)
    overflow_in_first_layer(model, optimizer, scaler)
    scaler.update()
    with pytest.raises(FloatingPointError, match=r"0\.weight"):
        overflow_in_first_layer(model, optimizer, scaler)


# ----------------------------------------------------------------- headroom


def headroom_reference(largest: float, margin_bits: int, low: float, high: float) -> float:
    """Largest power of two 2**k with largest * 2**k <= 65504 / 2**margin_bits, exactly."""
    k = math.floor(math.log2(65504 / largest))
    while Fraction(largest) * Fraction(2) ** k > 65504:
        k -= 1
    while Fraction(largest) * Fraction(2) ** (k + 1) <= 65504:
        k += 1
    return f32(min(max(2.0 ** (k - margin_bits), low), high))


@given(
    largest=st.floats(1e-30, 1e30).map(f32),
    margin_bits=st.integers(0, 8),
    others=st.lists(st.floats(0, 1), min_size=1, max_size=5),
)
def test_headroom_sets_the_largest_power_of_two_margin_bits_below_float16_max(
    largest, margin_bits, others
):
    grad = torch.tensor([-largest] + [f32(largest * o) for o in others])
    param = torch.nn.Parameter(torch.zeros_like(grad))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = LossScaler(strategy="headroom", margin_bits=margin_bits, init_scale=1.0, **WIDE_BOUNDS)
    param.grad = grad
    assert scaler.step(optimizer)
    scaler.update()
    expected = headroom_reference(largest, margin_bits, 2.0**-100, 2.0**100)
    assert scaler.get_scale() == expected


def test_headroom_scale_is_clamped_to_the_bounds():
    param, optimizer, scaler = single_param_setup({"strategy": "headroom"})
    param.grad = torch.full((3,), 1e-20)  # would ask for about 2**77
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**24


def test_headroom_backs_off_on_overflow():
    param, optimizer, scaler = single_param_setup({"strategy": "headroom", "init_scale": 2.0**10})
    assert drive(scaler, optimizer, param, overflow=True) is False
    assert scaler.get_scale() == 2.0**9


def test_headroom_with_all_zero_gradients_follows_the_growth_rule():
    param, optimizer, scaler = single_param_setup(
        {"strategy": "headroom", "init_scale": 2.0**10, "growth_interval": 2}
    )
    scales = []
    for _ in range(3):
        param.grad = torch.zeros(3)
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [2.0**10, 2.0**11, 2.0**11]


# ----------------------------------------------------------------- observability


def test_skip_counters_follow_the_steps():
    param, optimizer, scaler = single_param_setup()
    outcomes = []
    for overflow in (False, True, True, False):
        drive(scaler, optimizer, param, overflow)
        outcomes.append(scaler.last_step_skipped)
    assert outcomes == [False, True, True, False] and scaler.skipped_steps == 2


def test_history_records_each_iteration_and_is_bounded():
    param, optimizer, scaler = single_param_setup({"init_scale": 2.0**10, "history_size": 3})
    for overflow in (False, True, False, True):
        drive(scaler, optimizer, param, overflow)
    assert scaler.history == [
        ScaleRecord(1, 2.0**10, True, "inf"),
        ScaleRecord(2, 2.0**9, False, None),
        ScaleRecord(3, 2.0**9, True, "inf"),
    ]


@pytest.mark.parametrize(
    ("poison", "reason"), [([INF], "inf"), ([NAN], "nan"), ([NAN, -INF], "inf+nan")]
)
def test_history_reason_says_what_was_found(poison, reason):
    param, optimizer, scaler = single_param_setup()
    scaler.scale(torch.ones(()))
    param.grad = torch.tensor([1.0] * (3 - len(poison)) + poison)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.history[-1].reason == reason


def test_scale_tensor_is_the_live_device_scale():
    param, optimizer, scaler = single_param_setup({"init_scale": 2.0**10})
    drive(scaler, optimizer, param, overflow=True)
    tensor = scaler.scale_tensor
    assert tensor.dtype == torch.float32 and tensor.item() == scaler.get_scale() == 2.0**9


def test_overflow_report_names_parameters_by_module_path_with_counts():
    model = torch.nn.ModuleDict({"encoder": small_model(), "head": torch.nn.Linear(2, 1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**10)
    x, _ = batch(0)
    scaler.scale(model["head"](model["encoder"](x)).sum()).backward()
    model["encoder"][2].weight.grad[0, :3] = torch.tensor([NAN, INF, -INF])
    model["head"].bias.grad[0] = NAN
    assert scaler.step(optimizer) is False
    optimizer.zero_grad(set_to_none=True)  # the report was captured at skip time
    report = scaler.overflow_report(model)
    assert isinstance(report, OverflowReport) and report.step == 0 and report.scale == 2.0**10
    found = {(g.name, g.shape, g.nan_count, g.inf_count) for g in report.gradients}
    assert found == {("encoder.2.weight", (2, 8), 1, 2), ("head.bias", (1,), 1, 0)}
    assert "encoder.2.weight" in str(report)


def test_overflow_report_without_model_uses_optimizer_positions():
    param, optimizer, scaler = single_param_setup()
    drive(scaler, optimizer, param, overflow=True)
    (gradient,) = scaler.overflow_report().gradients
    assert gradient.name == "param_groups[0]['params'][0]" and gradient.inf_count == 3


def test_overflow_report_is_none_before_any_skip():
    param, optimizer, scaler = single_param_setup()
    drive(scaler, optimizer, param, overflow=False)
    assert scaler.overflow_report() is None


# ----------------------------------------------------------------- checkpoints


def train(model, optimizer, scaler, seeds, overflow_at):
    for seed in seeds:
        optimizer.zero_grad()
        scaler.scale(mse(model, seed)).backward()
        if seed in overflow_at:
            model[0].bias.grad[0] = INF
        scaler.step(optimizer)
        scaler.update()


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_from_state_dict_continues_bit_for_bit():
    kwargs = {"init_scale": 2.0**10, "growth_interval": 3, "hysteresis": 2}
    # Overflow at 5 leaves the hysteresis counter and growth tracker mid-way at the save
    # after 6 iterations; the overflow at 6 then shrinks only if the counter was restored.
    overflow_at = {2, 5, 6, 9}
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = LossScaler(**kwargs)
    train(model, optimizer, scaler, range(6), overflow_at)
    saved = roundtrip(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "sc": scaler.state_dict()}
    )
    train(model, optimizer, scaler, range(6, 14), overflow_at)

    resumed = small_model(seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved["opt"])
    resumed_scaler = LossScaler(**kwargs)
    resumed_scaler.load_state_dict(saved["sc"])
    train(resumed, resumed_optimizer, resumed_scaler, range(6, 14), overflow_at)

    assert_bitwise_equal(list(model.parameters()), list(resumed.parameters()))
    assert scaler.state_dict() == resumed_scaler.state_dict()
    assert scaler.skipped_steps == resumed_scaler.skipped_steps == 4


def test_state_dict_round_trip_restores_every_counter():
    param, optimizer, scaler = single_param_setup({"hysteresis": 3, "growth_interval": 5})
    for overflow in (False, False, True, True, False, True):
        drive(scaler, optimizer, param, overflow)
    fresh = LossScaler(hysteresis=3, growth_interval=5)
    fresh.load_state_dict(roundtrip(scaler.state_dict()))
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.history == scaler.history and fresh.last_step_skipped


def test_loads_a_grad_scaler_state_dict_and_continues_like_it():
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    ref_param, ref_optimizer, _ = single_param_setup()
    pattern = [False, False, True, False, False, False, False, True, False]
    for overflow in pattern[:5]:
        drive(reference, ref_optimizer, ref_param, overflow)
    param, optimizer, scaler = single_param_setup({"growth_interval": 3})
    scaler.load_state_dict(reference.state_dict())
    for overflow in pattern[5:]:
        drive(reference, ref_optimizer, ref_param, overflow)
        drive(scaler, optimizer, param, overflow)
        assert scaler.get_scale() == reference.get_scale()


def test_grad_scaler_can_load_our_state_dict():
    param, optimizer, scaler = single_param_setup({"growth_interval": 4})
    for overflow in (False, True, False):
        drive(scaler, optimizer, param, overflow)
    reference = torch.amp.GradScaler("cpu")
    reference.load_state_dict(scaler.state_dict())
    assert reference.get_scale() == scaler.get_scale()
    assert reference.get_growth_interval() == 4 and reference._get_growth_tracker() == 1


def test_config_mismatch_on_load_warns_and_keeps_own_config():
    saved = LossScaler(growth_interval=7, hysteresis=2).state_dict()
    scaler = LossScaler(growth_interval=5)
    with pytest.warns(UserWarning, match="growth_interval: saved 7, this scaler 5"):
        scaler.load_state_dict(saved)
    assert scaler.config.growth_interval == 5 and scaler.state_dict()["hysteresis_left"] == 1


def test_loaded_scale_outside_the_bounds_is_clamped_with_a_warning():
    scaler = LossScaler()
    with pytest.warns(UserWarning, match="clamped"):
        scaler.load_state_dict(torch.amp.GradScaler("cpu", init_scale=2.0**30).state_dict())
    assert scaler.get_scale() == 2.0**24


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ([("scale", 1.0)], TypeError, "mapping"),
        ({}, ValueError, "disabled"),
        ({"scale": 2.0}, ValueError, "_growth_tracker"),
        ({"scale": NAN, "_growth_tracker": 0}, ValueError, "scale"),
        ({"scale": -1.0, "_growth_tracker": 0}, ValueError, "scale"),
        ({"scale": "1", "_growth_tracker": 0}, TypeError, "scale"),
        ({"scale": 1.0, "_growth_tracker": -2}, ValueError, "_growth_tracker"),
    ],
)
def test_bad_state_dict_raises(state, error, match):
    with pytest.raises(error, match=match):
        LossScaler().load_state_dict(state)


def test_state_dict_between_step_and_update_raises():
    param, optimizer, scaler = single_param_setup()
    param.grad = torch.ones(3)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after update"):
        scaler.state_dict()


# ----------------------------------------------------------------- training patterns


def test_gradient_accumulation_equals_unscaled_float32_accumulation_bitwise():
    reference, model = small_model(), small_model()
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = LossScaler(init_scale=2.0**14)
    micro_batches = 4
    for step in range(2):
        for micro in range(micro_batches):
            seed = step * micro_batches + micro
            (mse(reference, seed) / micro_batches).backward()
            scaler.scale(mse(model, seed) / micro_batches).backward()
        reference_opt.step()
        reference_opt.zero_grad()
        assert scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert_bitwise_equal(list(reference.parameters()), list(model.parameters()))


def two_optimizer_run(scaler, overflow_pattern):
    model = small_model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    second = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    scales = []
    for seed, (first_overflows, second_overflows) in enumerate(overflow_pattern):
        first.zero_grad()
        second.zero_grad()
        scaler.scale(mse(model, seed)).backward()
        if first_overflows:
            model[0].weight.grad[1, 1] = INF
        if second_overflows:
            model[2].bias.grad[0] = NAN
        scaler.step(first)
        scaler.step(second)
        scaler.update()
        scales.append(scaler.get_scale())
    return list(model.parameters()), scales


def test_two_optimizers_with_one_update_behave_like_grad_scaler():
    pattern = [(False, False), (True, False), (False, True), (True, True), (False, False)]
    kwargs = {"init_scale": 2.0**10, "growth_interval": 2}
    expected_params, expected_scales = two_optimizer_run(
        torch.amp.GradScaler("cpu", **kwargs), pattern
    )
    params, scales = two_optimizer_run(LossScaler(**kwargs), pattern)
    assert scales == expected_scales == [2.0**10, 2.0**9, 2.0**8, 2.0**7, 2.0**7]
    assert_bitwise_equal(expected_params, params)


def test_history_counts_one_record_per_iteration_with_two_optimizers():
    scaler = LossScaler()
    two_optimizer_run(scaler, [(True, True), (False, False)])
    assert [record.skipped for record in scaler.history] == [True, False]
    assert scaler.skipped_steps == 2  # both optimizers skipped in the first iteration


def test_update_without_any_step_raises():
    with pytest.raises(RuntimeError, match="step"):
        LossScaler().update()


# ----------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_state_lives_on_the_gpu_and_only_step_synchronises():
    model = small_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(strategy="headroom", hysteresis=2)
    x, y = (t.cuda() for t in batch(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scaled = scaler.scale((model(x) - y).square().mean())
        scaled.backward()
        scaler.unscale_(optimizer)
        torch.cuda.set_sync_debug_mode("default")
        assert scaler.step(optimizer)
        torch.cuda.set_sync_debug_mode("error")
        scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scaler.scale_tensor.device.type == "cuda"


@pytest.mark.cuda
@given(pattern=st.lists(st.booleans(), min_size=1, max_size=20))
def test_cuda_scale_sequence_equals_grad_scaler(pattern):
    factors = {"init_scale": 1000.0, "growth_factor": 3.0, "backoff_factor": 0.3}
    factors["growth_interval"] = 2
    reference = torch.amp.GradScaler("cuda", **factors)
    ref_param, ref_optimizer, _ = single_param_setup(device="cuda")
    param, optimizer, scaler = single_param_setup({**factors, **WIDE_BOUNDS}, device="cuda")
    for overflow in pattern:
        drive(reference, ref_optimizer, ref_param, overflow)
        drive(scaler, optimizer, param, overflow)
        assert scaler.get_scale() == reference.get_scale()
    assert torch.equal(param, ref_param)


@pytest.mark.cuda
@pytest.mark.parametrize("poisoned", ["cpu", "cuda"])
def test_gradients_on_two_devices_are_checked_together(poisoned):
    params = {
        device: torch.nn.Parameter(torch.zeros(3, device=device)) for device in ("cpu", "cuda")
    }
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**4)
    for device, param in params.items():
        param.grad = scaler.scale(torch.ones(3, device=device))
    params[poisoned].grad[1] = INF
    assert scaler.step(optimizer) is False
    scaler.update()
    assert scaler.get_scale() == 2.0**3 and scaler.scale_tensor.device.type == "cpu"
    assert all(torch.equal(p.detach().cpu(), torch.zeros(3)) for p in params.values())


# ----------------------------------------------------------------- fused unscale + clip


def torch_two_step(init_scale, clip_norm, seed=0, norm_type=2.0):
    """torch.amp.GradScaler.unscale_ followed by torch.nn.utils.clip_grad_norm_."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = torch.amp.GradScaler("cpu", init_scale=init_scale)
    reference.scale(mse(model, seed) * 50).backward()
    reference.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm, norm_type)
    return norm, [p.grad.clone() for p in model.parameters()]


def fused(init_scale, clip_norm, seed=0, norm_type=2.0, **scaler_kwargs):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=init_scale, **scaler_kwargs)
    scaler.scale(mse(model, seed) * 50).backward()
    norm = scaler.unscale_(optimizer, clip_norm=clip_norm, norm_type=norm_type)
    return norm, [p.grad.clone() for p in model.parameters()], (model, optimizer, scaler)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
@pytest.mark.parametrize("clip_norm", [0.1, 1e9])
def test_fused_unscale_and_clip_equals_torch_two_step_bitwise_for_power_of_two_scales(
    norm_type, clip_norm
):
    expected_norm, expected_grads = torch_two_step(2.0**16, clip_norm, norm_type=norm_type)
    norm, grads, _ = fused(2.0**16, clip_norm, norm_type=norm_type)
    assert torch.equal(norm, expected_norm)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))


@given(init_scale=st.floats(1.0, 2.0**20), seed=st.integers(0, 100))
def test_fused_unscale_and_clip_equals_torch_two_step_within_float32_rounding(init_scale, seed):
    init_scale = f32(init_scale)
    expected_norm, expected_grads = torch_two_step(init_scale, 0.5, seed)
    norm, grads, _ = fused(init_scale, 0.5, seed, **WIDE_BOUNDS)
    # Two float32 roundings (of 1/S, of the product) separate the paths.
    torch.testing.assert_close(norm, expected_norm, rtol=4e-7, atol=0)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=4e-7, atol=1e-45)


def test_unscale_without_clip_norm_returns_none():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler()
    scaler.scale(mse(model, 0)).backward()
    assert scaler.unscale_(optimizer) is None


def test_fused_step_equals_torch_grad_scaler_training_with_clipping():
    model, reference_model = small_model(), small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    scaler = LossScaler(init_scale=2.0**12, growth_interval=2)
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for seed in range(5):
        for m, o, s in ((model, optimizer, scaler), (reference_model, reference_optimizer, None)):
            o.zero_grad()
            if s is None:
                reference.scale(mse(m, seed) * 30).backward()
                reference.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3)
                reference.step(o)
                reference.update()
            else:
                s.scale(mse(m, seed) * 30).backward()
                s.unscale_(o, clip_norm=0.3)
                s.step(o)
                s.update()
    assert scaler.get_scale() == reference.get_scale()
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("poison", "reason"), [(INF, "inf"), (NAN, "nan")])
def test_fused_clip_with_a_nonfinite_gradient_skips_and_reports_it(poison, reason):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**10)
    scaler.scale(mse(model, 0)).backward()
    model[0].weight.grad[1, 2] = poison
    before = params_and_state(model, optimizer)
    norm = scaler.unscale_(optimizer, clip_norm=1.0)
    assert not math.isfinite(norm.item())
    assert scaler.step(optimizer) is False
    scaler.update()
    assert_bitwise_equal(before, params_and_state(model, optimizer))
    assert scaler.get_scale() == 2.0**9
    assert scaler.history[-1].reason == reason
    report = scaler.overflow_report(model)
    counts = {"inf": (1, 0), "nan": (0, 1)}[reason]
    assert [(g.name, g.inf_count, g.nan_count) for g in report.gradients] == [("0.weight", *counts)]


def test_fused_clip_on_an_overflow_only_unscales_the_finite_gradients():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = LossScaler(init_scale=2.0**4)
    scaler.scale(torch.ones(()))
    param.grad = torch.tensor([32.0, INF, -48.0])
    scaler.unscale_(optimizer, clip_norm=1e-3)
    assert param.grad.tolist() == [2.0, INF, -3.0]


def test_fused_headroom_chooses_the_same_next_scale_as_unfused():
    scales = []
    for clip in (True, False):
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = LossScaler(init_scale=2.0**10, strategy="headroom")
        scaler.scale(mse(model, 0) * 1000).backward()
        if clip:
            scaler.unscale_(optimizer, clip_norm=1e-3)
        else:
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales[0] == scales[1]


def test_fused_clip_unscales_and_clips_coalesced_sparse_gradients():
    embedding = torch.nn.Embedding(6, 2, sparse=True)
    optimizer = torch.optim.SGD(embedding.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**3)
    # Index 1 appears twice: its rows sum to [2, 2] * 3 before scaling.
    loss = (embedding(torch.tensor([1, 1, 4])) * torch.tensor([3.0, 4.0])).sum()
    scaler.scale(loss).backward()
    norm = scaler.unscale_(optimizer, clip_norm=1.0)
    dense = torch.zeros(6, 2)
    dense[1] = torch.tensor([6.0, 8.0])
    dense[4] = torch.tensor([3.0, 4.0])
    expected = torch.linalg.vector_norm(dense.double()).item()
    assert norm.item() == pytest.approx(expected, rel=1e-7)
    torch.testing.assert_close(
        embedding.weight.grad.to_dense(), dense / (expected + 1e-6), rtol=1e-6, atol=0
    )


def test_fused_clip_never_syncs(monkeypatch):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(strategy="headroom")
    loss = mse(model, 0)
    syncs = _CountingSyncs(monkeypatch)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer, clip_norm=1.0)
    assert syncs.calls == []
    scaler.step(optimizer)
    assert syncs.calls == ["tolist"]


def test_fused_clip_on_a_disabled_scaler_is_clip_grad_norm():
    model, reference_model = small_model(), small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mse(model, 0).backward()
    mse(reference_model, 0).backward()
    norm = LossScaler(enabled=False).unscale_(optimizer, clip_norm=0.2)
    expected = torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.2)
    assert torch.equal(norm, expected)
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"clip_norm": -1.0}, ValueError, "clip_norm"),
        ({"clip_norm": NAN}, ValueError, "clip_norm"),
        ({"clip_norm": "1"}, TypeError, "clip_norm"),
        ({"clip_norm": 1.0, "norm_type": 0.0}, ValueError, "norm_type"),
        ({"clip_norm": 1.0, "norm_type": -INF}, ValueError, "norm_type"),
        ({"clip_norm": 1.0, "norm_process_group": "default"}, TypeError, "process_group"),
    ],
)
def test_fused_clip_rejects_bad_arguments_before_touching_gradients(kwargs, error, name):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**4)
    scaler.scale(mse(model, 0)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(error, match=name):
        scaler.unscale_(optimizer, **kwargs)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    scaler.unscale_(optimizer)  # the failed call did not count as this iteration's unscale_


@pytest.mark.cuda
def test_cuda_fused_clip_never_syncs_and_equals_torch():
    model = small_model().cuda()
    reference_model = small_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    scaler = LossScaler()
    reference = torch.amp.GradScaler("cuda")
    x, y = (t.cuda() for t in batch(0))
    reference.scale((reference_model(x) - y).square().mean()).backward()
    reference.unscale_(reference_optimizer)
    expected = torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.1)
    scaled = scaler.scale((model(x) - y).square().mean())
    scaled.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = scaler.unscale_(optimizer, clip_norm=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(norm, expected)
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


# ----------------------------------------------------------------- veto


def vetoed_iteration(scaler, optimizer, param, veto, overflow=False, **step_kwargs):
    param.grad = torch.full_like(param, INF) if overflow else scaler.scale(torch.ones_like(param))
    stepped = scaler.step(optimizer, veto=veto, **step_kwargs)
    scaler.update()
    return stepped


@pytest.mark.parametrize("veto", [True, torch.tensor(True), torch.tensor([1.0]), torch.tensor(3)])
def test_veto_skips_the_step_leaving_parameters_and_optimizer_state_untouched(veto):
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**10)
    scaler.scale(mse(model, 0)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    scaler.scale(mse(model, 1)).backward()
    before = params_and_state(model, optimizer)
    assert scaler.step(optimizer, veto=veto) is False
    scaler.update()
    assert_bitwise_equal(before, params_and_state(model, optimizer))


@pytest.mark.parametrize("veto", [False, torch.tensor(False), torch.tensor(0.0), None])
def test_false_veto_steps(veto):
    param, optimizer, scaler = single_param_setup()
    assert vetoed_iteration(scaler, optimizer, param, veto) is True
    assert not torch.equal(param.detach(), torch.zeros(3))


def test_veto_leaves_the_scale_and_its_growth_counter_unchanged():
    param, optimizer, scaler = single_param_setup({"init_scale": 2.0**10, "growth_interval": 2})
    # GradScaler's rule counts two finite steps, then grows: the vetoed step in between
    # does not count.
    outcomes = [vetoed_iteration(scaler, optimizer, param, veto) for veto in (False, True)]
    assert scaler.get_scale() == 2.0**10
    outcomes.append(vetoed_iteration(scaler, optimizer, param, False))
    assert outcomes == [True, False, True]
    assert scaler.get_scale() == 2.0**11


def test_veto_leaves_the_hysteresis_counter_unchanged():
    param, optimizer, scaler = single_param_setup({"init_scale": 2.0**10, "hysteresis": 2})
    vetoed_iteration(scaler, optimizer, param, False, overflow=True)  # hysteresis 2 -> 1
    vetoed_iteration(scaler, optimizer, param, True)  # a good step would reset it to 2
    vetoed_iteration(scaler, optimizer, param, False, overflow=True)
    assert scaler.get_scale() == 2.0**9


def test_veto_is_not_an_overflow_in_the_counters_and_history():
    param, optimizer, scaler = single_param_setup({"init_scale": 2.0**10})
    vetoed_iteration(scaler, optimizer, param, torch.tensor(True))
    vetoed_iteration(scaler, optimizer, param, True, veto_reason="spike")
    vetoed_iteration(scaler, optimizer, param, False)
    assert scaler.skipped_steps == 2 and scaler.vetoed_steps == 2
    assert scaler.history == [
        ScaleRecord(0, 2.0**10, True, "veto"),
        ScaleRecord(1, 2.0**10, True, "spike"),
        ScaleRecord(2, 2.0**10, False, None),
    ]
    assert scaler.overflow_report() is None


def test_overflow_takes_precedence_over_a_veto():
    param, optimizer, scaler = single_param_setup({"init_scale": 2.0**10})
    assert vetoed_iteration(scaler, optimizer, param, True, overflow=True) is False
    assert scaler.get_scale() == 2.0**9
    assert scaler.vetoed_steps == 0 and scaler.history[-1].reason == "inf"


def test_veto_of_one_optimizer_lets_the_other_count_toward_growth():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    optimizers = [torch.optim.SGD([p], lr=0.1) for p in params]
    scaler = LossScaler(init_scale=2.0**4, growth_interval=1)
    for param in params:
        param.grad = scaler.scale(torch.ones(2))
    assert scaler.step(optimizers[0], veto=True) is False
    assert scaler.step(optimizers[1]) is True
    scaler.update()
    assert scaler.get_scale() == 2.0**5
    assert scaler.history[-1] == ScaleRecord(0, 2.0**4, True, "veto")


def test_step_with_a_tensor_veto_syncs_once(monkeypatch):
    param, optimizer, scaler = single_param_setup()
    param.grad = scaler.scale(torch.ones(3))
    veto = torch.tensor(True)
    syncs = _CountingSyncs(monkeypatch)
    scaler.step(optimizer, veto=veto)
    scaler.update()
    assert syncs.calls == ["tolist"]


def test_disabled_scaler_still_honours_a_veto():
    param, optimizer, scaler = single_param_setup({"enabled": False})
    param.grad = torch.ones(3)
    assert scaler.step(optimizer, veto=torch.tensor(True)) is False
    assert torch.equal(param.detach(), torch.zeros(3))
    assert scaler.step(optimizer, veto=False) is True
    assert scaler.skipped_steps == 1 and scaler.vetoed_steps == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"veto": "yes"}, TypeError, "veto"),
        ({"veto": torch.tensor([True, False])}, ValueError, "veto"),
        ({"veto": torch.tensor(1j)}, TypeError, "veto"),
        ({"veto": True, "veto_reason": ""}, TypeError, "veto_reason"),
        ({"veto": True, "veto_reason": 3}, TypeError, "veto_reason"),
    ],
)
def test_step_rejects_a_bad_veto_before_stepping(kwargs, error, name):
    param, optimizer, scaler = single_param_setup()
    param.grad = scaler.scale(torch.ones(3))
    with pytest.raises(error, match=name):
        scaler.step(optimizer, **kwargs)
    assert scaler.step(optimizer) is True


def test_vetoed_steps_survive_a_state_dict_round_trip():
    param, optimizer, scaler = single_param_setup()
    vetoed_iteration(scaler, optimizer, param, True)
    restored = LossScaler()
    restored.load_state_dict(roundtrip(scaler.state_dict()))
    assert restored.vetoed_steps == 1 and restored.history == scaler.history


def test_state_dict_without_vetoed_steps_loads_with_zero():
    param, optimizer, scaler = single_param_setup()
    vetoed_iteration(scaler, optimizer, param, False)
    state = scaler.state_dict()
    del state["vetoed_steps"]
    restored = LossScaler()
    restored.load_state_dict(state)
    assert restored.vetoed_steps == 0 and restored.skipped_steps == 0
