"""Specification of ``finite.precision.compensated``.

References are independent of the code under test: float32 optimizer trajectories from
PyTorch's own optimizers and float64 arithmetic. Its stochastic rounding is specified in
``tests/test_rounding.py``.
"""

import io
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finite.precision import CompensatedOptimizer, compensated

LOW = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# --------------------------------------------------------------------------------------
# Tracking a float32 trajectory
# --------------------------------------------------------------------------------------


def regression(rows=1, dim=64, scale=0.1, seed=0):
    """A least-squares problem: returns (initial weights, gradient function)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(256, dim, generator=g)
    target = features @ (scale * torch.randn(dim, generator=g))
    hessian = features.T @ features / 256
    offset = features.T @ target / 256
    w0 = (scale * torch.randn(rows, dim, generator=g)).squeeze(0)
    return w0, lambda w: w @ hessian - offset


OPTIMIZERS = {
    "sgd_momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
}


def trajectory(kind, make_opt, w0, grad_fn, steps=200, lr=1e-4, device="cpu", seed=1):
    """Final weights (float32) after ``steps`` of ``make_opt`` on the regression."""
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    p = torch.nn.Parameter(w0.to(device=device, dtype=dtype, copy=True))
    opt = make_opt([p], lr)
    if kind in ("kahan", "stochastic"):
        opt = compensated(opt, kind, torch.Generator(device).manual_seed(seed))
    for _ in range(steps):
        p.grad = grad_fn(p.detach().float().to(w0.device)).to(device=device, dtype=dtype)
        opt.step()
    return p.detach().float().cpu()


def relative_errors(make_opt, kinds, **kwargs):
    w0, grad_fn = regression()
    reference = trajectory("float32", make_opt, w0, grad_fn, **kwargs)
    moved = (reference - w0).norm()
    return {
        k: ((trajectory(k, make_opt, w0, grad_fn, **kwargs) - reference).norm() / moved)
        for k in kinds
    }


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("device", DEVICES)
def test_kahan_tracks_float32_far_better_than_plain_bfloat16(name, device):
    # Weights ~0.1, lr 1e-4: most updates are below half a bfloat16 ulp (measured:
    # plain 0.81/0.90 of the distance moved, kahan 0.006/0.013 for SGD/AdamW).
    errors = relative_errors(OPTIMIZERS[name], ["plain", "kahan"], device=device)
    assert errors["plain"] > 0.5
    assert errors["kahan"] < errors["plain"] / 20


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_stochastic_tracks_float32_better_than_plain_bfloat16(name):
    # Measured: stochastic 0.09/0.13 of the distance moved against plain 0.81/0.90.
    errors = relative_errors(OPTIMIZERS[name], ["plain", "stochastic"])
    assert errors["stochastic"] < errors["plain"] / 3


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_stochastic_trajectory_is_unbiased(name):
    # 64 independent rows follow the same problem; rounding noise averages out across
    # them while a bias (as in plain rounding) would not.
    rows = 64
    w0, grad_fn = regression(rows=rows)
    make_opt = OPTIMIZERS[name]
    reference = trajectory("float32", make_opt, w0, grad_fn)
    stochastic = trajectory("stochastic", make_opt, w0, grad_fn)
    moved = (reference - w0).norm(dim=1).mean()
    single_row = ((stochastic - reference).norm(dim=1) / moved).mean()
    averaged = (stochastic - reference).mean(0).norm() / (reference - w0).mean(0).norm()
    assert averaged < single_row / 4  # sqrt(64) = 8 if the errors were pure noise


def test_float32_parameters_are_passed_through():
    torch.manual_seed(0)
    low = torch.nn.Parameter(torch.randn(8).bfloat16())
    full = torch.nn.Parameter(torch.randn(8))
    twin = torch.nn.Parameter(full.detach().clone())
    opt = compensated(torch.optim.AdamW([low, full], lr=1e-2))
    plain = torch.optim.AdamW([twin], lr=1e-2)
    for _ in range(5):
        grad = torch.randn(8)
        low.grad, full.grad, twin.grad = grad.bfloat16(), grad.clone(), grad.clone()
        opt.step()
        plain.step()
    assert torch.equal(full, twin)
    assert low.dtype == torch.bfloat16


def test_optimizer_state_is_float32():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = compensated(torch.optim.AdamW([p], lr=1e-3))
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_existing_low_precision_state_is_converted_to_float32_on_wrap():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    inner = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(8).bfloat16()
    inner.step()
    before = inner.state[p]["exp_avg"].clone()
    opt = compensated(inner)
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[p]["exp_avg"], before.float())
    opt.step()  # the float32 state works with the float32 view of p


def test_weights_and_gradients_keep_their_storage_and_dtype():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=0.1))
    grad = torch.randn(8).bfloat16()
    p.grad = grad
    storage = p.data_ptr()
    opt.step()
    assert p.dtype == torch.bfloat16 and p.data_ptr() == storage
    assert p.grad is grad


def test_failing_inner_step_restores_parameters():
    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            super().step()
            raise RuntimeError("boom")

    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    before = p.detach().clone()
    grad = torch.randn(8).bfloat16()
    p.grad = grad
    opt = compensated(Failing([p], lr=0.1))
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert p.dtype == torch.bfloat16 and p.grad is grad
    assert torch.equal(p.detach(), before)


# --------------------------------------------------------------------------------------
# Swamping meter
# --------------------------------------------------------------------------------------


def discarded_by_nearest(w: torch.Tensor, update64: torch.Tensor) -> torch.Tensor:
    """Direct count: is ``update`` non-zero and smaller than half the gap to the
    neighbour of ``w`` in its direction (the gap below a power of two is half)?"""
    w64 = w.double()
    up = torch.nextafter(w, torch.full_like(w, math.inf)).double() - w64
    down = w64 - torch.nextafter(w, torch.full_like(w, -math.inf)).double()
    half_gap = torch.where(update64 > 0, up, down) / 2
    assert not torch.any(update64.abs() == half_gap), "ties make the count ambiguous"
    return (update64 != 0) & (update64.abs() < half_gap)


@pytest.mark.parametrize("method", ["kahan", "stochastic"])
def test_lost_update_fraction_matches_a_direct_count(method):
    g = torch.Generator().manual_seed(3)
    lr = 1e-3
    p = torch.nn.Parameter(torch.randn(4000, generator=g).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=lr), method, torch.Generator().manual_seed(4))
    for _ in range(3):  # leaves a non-zero compensation for "kahan"
        p.grad = (torch.randn(4000, generator=g) * 0.5).bfloat16()
        opt.step()
    # Updates at 5%-90% or 110%-300% of half the gap, so float32 rounding inside the
    # optimizer cannot move one across the threshold; a tenth are exactly zero.
    w = p.detach().clone()
    w64 = w.double()
    sign = torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0).double()
    gap = torch.where(
        sign > 0,
        torch.nextafter(w, torch.full_like(w, math.inf)).double() - w64,
        w64 - torch.nextafter(w, torch.full_like(w, -math.inf)).double(),
    )
    small = torch.rand(4000, generator=g) < 0.5
    factor = torch.where(
        small,
        0.05 + 0.85 * torch.rand(4000, generator=g),
        1.1 + 1.9 * torch.rand(4000, generator=g),
    ).double()
    factor[torch.rand(4000, generator=g) < 0.1] = 0.0
    p.grad = (-(sign * factor * gap / 2) / lr).bfloat16()
    update64 = -lr * p.grad.double()
    expected = discarded_by_nearest(w, update64).double().mean().item()
    opt.step()
    assert 0.3 < expected < 0.6
    assert opt.stats()["lost_update_fraction"] == pytest.approx(expected, abs=1e-12)


def test_lost_update_fraction_is_nan_before_the_first_step():
    p = torch.nn.Parameter(torch.randn(4).bfloat16())
    assert math.isnan(compensated(torch.optim.SGD([p], lr=1.0)).stats()["lost_update_fraction"])


def test_lost_update_fraction_is_zero_when_updates_are_large():
    p = torch.nn.Parameter(torch.randn(100).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1.0))
    p.grad = torch.sign(p.detach()) * p.detach().abs().clamp(min=1.0)
    opt.step()
    assert opt.stats()["lost_update_fraction"] == 0.0


def step_with_random_grads(opt, p, steps, generator):
    for _ in range(steps):
        p.grad = (torch.randn(p.shape, generator=generator) * 0.5).bfloat16()
        opt.step()


def test_meter_runs_at_step_one_and_every_meter_every_steps_after():
    p = torch.nn.Parameter(torch.randn(100).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1e-3), meter_every=3)
    g = torch.Generator().manual_seed(0)
    measured = []
    for _ in range(8):
        step_with_random_grads(opt, p, 1, g)
        measured.append(opt.stats()["measured_at_step"])
    assert measured == [1, 1, 1, 4, 4, 4, 7, 7]
    assert opt.stats()["step"] == 8


def test_meter_every_zero_never_runs_the_meter():
    p = torch.nn.Parameter(torch.randn(100).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1e-3), meter_every=0)
    step_with_random_grads(opt, p, 3, torch.Generator().manual_seed(0))
    stats = opt.stats()
    assert math.isnan(stats["lost_update_fraction"])
    assert stats["measured_at_step"] is None
    assert stats["step"] == 3


def test_stats_between_meter_runs_report_the_last_metered_step():
    lr = 1e-3
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4000, generator=g).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=lr), "stochastic", meter_every=2)
    step_with_random_grads(opt, p, 2, g)
    w = p.detach().clone()
    grad = (torch.randn(4000, generator=g) * 3.0).bfloat16()
    # A tie with half the gap (lr * 3.90625 = 2**-8) would make the count ambiguous.
    half_gaps = {2.0**k for k in range(-12, -4)}
    grad[torch.tensor([abs(lr * v) in half_gaps for v in grad.double().tolist()])] = 0.0
    p.grad = grad  # step 3: metered
    expected = discarded_by_nearest(w, -lr * p.grad.double()).double().mean().item()
    opt.step()
    p.grad = torch.full((4000,), 1e3).bfloat16()  # step 4: not metered, nothing lost
    opt.step()
    assert 0.1 < expected < 0.9
    stats = opt.stats()
    assert stats["measured_at_step"] == 3
    assert stats["lost_update_fraction"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("method", ["kahan", "stochastic"])
def test_meter_schedule_does_not_change_the_updates(method):
    finals = []
    for meter_every in (1, 0, 3):
        g = torch.Generator().manual_seed(2)
        p = torch.nn.Parameter(torch.randn(300, generator=g).bfloat16())
        inner = torch.optim.AdamW([p], lr=1e-4)
        opt = compensated(inner, method, torch.Generator().manual_seed(3), meter_every=meter_every)
        step_with_random_grads(opt, p, 5, g)
        finals.append(opt.state_dict()["compensated"]["compensation"])
        finals.append(p.detach().clone())
    assert torch.equal(finals[1], finals[3]) and torch.equal(finals[1], finals[5])
    for i in finals[0]:
        assert torch.equal(finals[0][i], finals[2][i]) and torch.equal(finals[0][i], finals[4][i])


def test_meter_schedule_resumes_from_state_dict():
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1e-3), meter_every=3)
    step_with_random_grads(opt, p, 2, torch.Generator().manual_seed(0))
    q = torch.nn.Parameter(p.detach().clone())
    resumed = compensated(torch.optim.SGD([q], lr=1e-3), meter_every=3)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.stats()["step"] == 2
    assert resumed.stats()["measured_at_step"] is None
    step_with_random_grads(resumed, q, 2, torch.Generator().manual_seed(1))
    assert resumed.stats()["measured_at_step"] == 4


@pytest.mark.parametrize("value", [1.5, "2", True, None])
def test_rejects_a_meter_every_that_is_not_an_int(value):
    p = torch.nn.Parameter(torch.randn(4).bfloat16())
    with pytest.raises(TypeError, match="meter_every must be an int, got"):
        compensated(torch.optim.SGD([p], lr=1.0), meter_every=value)


@given(value=st.integers(max_value=-1))
def test_rejects_a_negative_meter_every(value):
    p = torch.nn.Parameter(torch.randn(4).bfloat16())
    with pytest.raises(ValueError, match=rf"meter_every must be >= 0.*got {value}"):
        compensated(torch.optim.SGD([p], lr=1.0), meter_every=value)


def test_load_state_dict_rejects_a_negative_step_count():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1e-3))
    state = opt.state_dict()
    state["compensated"]["step"] = -1
    with pytest.raises(ValueError, match=r"\['step'\] must be an int >= 0, got -1"):
        opt.load_state_dict(state)


# --------------------------------------------------------------------------------------
# Reproducibility and checkpoints
# --------------------------------------------------------------------------------------


def run_steps(opt, p, grads):
    for grad in grads:
        p.grad = grad.clone()
        opt.step()


def test_stochastic_is_reproducible_with_a_generator():
    grads = [torch.randn(256).bfloat16() for _ in range(5)]
    w0 = torch.randn(256).bfloat16()
    finals = []
    for seed in (7, 7, 8):
        p = torch.nn.Parameter(w0.clone())
        opt = compensated(
            torch.optim.SGD([p], lr=1e-3), "stochastic", torch.Generator().manual_seed(seed)
        )
        run_steps(opt, p, grads)
        finals.append(p.detach().clone())
    assert torch.equal(finals[0], finals[1])
    assert not torch.equal(finals[0], finals[2])


@pytest.mark.parametrize("method", ["kahan", "stochastic"])
def test_state_dict_round_trip_resumes_bit_for_bit(method):
    torch.manual_seed(0)
    grads = [torch.randn(64).bfloat16() * 0.1 for _ in range(10)]

    def make(weights):
        p = torch.nn.Parameter(weights.clone())
        inner = torch.optim.AdamW([p], lr=1e-4)
        return p, compensated(inner, method, torch.Generator().manual_seed(5))

    p, opt = make(torch.randn(64).bfloat16())
    run_steps(opt, p, grads[:5])
    checkpoint = io.BytesIO()
    torch.save({"weights": p.detach(), "opt": opt.state_dict()}, checkpoint)
    run_steps(opt, p, grads[5:])

    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    q, resumed = make(saved["weights"])
    resumed.generator.manual_seed(999)  # the checkpoint must restore it
    resumed.load_state_dict(saved["opt"])
    run_steps(resumed, q, grads[5:])
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["exp_avg_sq"], resumed.state[q]["exp_avg_sq"])
    saved_buffers = opt.state_dict()["compensated"]["compensation"]
    resumed_buffers = resumed.state_dict()["compensated"]["compensation"]
    assert saved_buffers.keys() == resumed_buffers.keys() == ({0} if method == "kahan" else set())
    for i in saved_buffers:
        assert torch.equal(saved_buffers[i], resumed_buffers[i])


def test_state_dict_holds_the_compensation_that_reconstructs_the_weight():
    p = torch.nn.Parameter(torch.full((16,), 1.5).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1e-3))
    for _ in range(3):
        p.grad = torch.ones(16).bfloat16()
        opt.step()
    buffer = opt.state_dict()["compensated"]["compensation"][0]
    # Three SGD updates of -1e-3 from 1.5 add up to less than half its ulp (2**-8).
    assert torch.equal(p.detach(), torch.full((16,), 1.5).bfloat16())
    assert (p.double() + buffer.double() - (1.5 - 3e-3)).abs().max() < 2**-8 * 2**-9


def test_plain_optimizer_state_dict_loads_with_zero_compensation():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    plain = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(8).bfloat16()
    plain.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt = compensated(torch.optim.AdamW([q], lr=1e-3))
    opt.load_state_dict(plain.state_dict())
    assert opt.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[q]["exp_avg"], plain.state[p]["exp_avg"].float())
    assert opt.state_dict()["compensated"]["compensation"] == {}


def test_compensated_state_dict_loads_into_a_plain_optimizer():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = compensated(torch.optim.AdamW([p], lr=1e-3))
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    plain = torch.optim.AdamW([q], lr=1e-3)
    plain.load_state_dict(opt.state_dict())
    assert torch.equal(plain.state[q]["exp_avg"], opt.state[p]["exp_avg"].bfloat16())


def test_load_state_dict_rejects_mismatches():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1e-3))
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    state = opt.state_dict()
    state["compensated"]["compensation"][0] = torch.zeros(9).bfloat16()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(state)
    state["compensated"]["compensation"] = {3: torch.zeros(8).bfloat16()}
    with pytest.raises(ValueError, match="parameter 3"):
        opt.load_state_dict(state)
    other = compensated(torch.optim.SGD([p], lr=1e-3), "stochastic")
    with pytest.raises(ValueError, match="method"):
        other.load_state_dict(opt.state_dict())


# --------------------------------------------------------------------------------------
# Behaves like an optimizer
# --------------------------------------------------------------------------------------


def test_is_an_optimizer_that_lr_schedulers_drive():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    inner = torch.optim.SGD([p], lr=1.0)
    opt = compensated(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is inner.param_groups


def test_closure_is_evaluated_once_and_its_loss_returned():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=0.1))
    calls = []

    def closure():
        calls.append(p.dtype)
        opt.zero_grad()
        loss = p.float().square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [torch.bfloat16]
    assert loss.item() > 0


def test_zero_grad_clears_gradients():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=0.1))
    p.grad = torch.randn(8).bfloat16()
    opt.zero_grad()
    assert p.grad is None


def test_added_param_group_is_compensated():
    p = torch.nn.Parameter(torch.ones(4).bfloat16())
    q = torch.nn.Parameter(torch.ones(4).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=1e-3))
    opt.add_param_group({"params": [q]})
    for _ in range(8):
        q.grad = torch.ones(4).bfloat16()
        opt.step()
    # Eight updates of -1e-3 each, all below half an ulp of 1.0: plain bfloat16 keeps 1.0.
    assert torch.all(q.detach() < 1.0)


def test_step_runs_inside_a_compiled_function():
    p = torch.nn.Parameter(torch.ones(4).bfloat16())
    opt = compensated(torch.optim.SGD([p], lr=0.25))

    @torch.compile(backend="eager")
    def train_step():
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()

    train_step()
    assert torch.equal(p.detach(), torch.full((4,), 0.75, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def persistent_bytes_per_parameter(opt, params):
    """Weights + optimizer state + compensation buffers, per weight element."""
    tensors = list(params)
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    if isinstance(opt, CompensatedOptimizer):
        tensors += list(opt.state_dict()["compensated"]["compensation"].values())
    elements = sum(p.numel() for p in params)
    return sum(t.numel() * t.element_size() for t in tensors) / elements


# Bytes per parameter, from the dtypes: bfloat16 weight 2, compensation 2 (bfloat16),
# optimizer state 4 per float32 moment (compensated) or 2 per bfloat16 moment (plain).
EXPECTED_BYTES = {
    ("plain", "sgd_momentum"): 2 + 2,
    ("plain", "adamw"): 2 + 2 * 2,
    ("kahan", "sgd_momentum"): 2 + 2 + 4,
    ("kahan", "adamw"): 2 + 2 + 2 * 4,
    ("stochastic", "sgd_momentum"): 2 + 4,
    ("stochastic", "adamw"): 2 + 2 * 4,
}


@pytest.mark.parametrize(("method", "name"), EXPECTED_BYTES)
def test_bytes_per_parameter_match_the_documented_table(method, name):
    params = [torch.nn.Parameter(torch.randn(50_000).bfloat16()) for _ in range(2)]
    opt = OPTIMIZERS[name](params, 1e-3)
    if method != "plain":
        opt = compensated(opt, method)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad()
    # AdamW's per-tensor "step" counters add 8 bytes per tensor: 1e-4 per element here.
    assert persistent_bytes_per_parameter(opt, params) == pytest.approx(
        EXPECTED_BYTES[method, name], abs=1e-3
    )


@pytest.mark.cuda
@pytest.mark.parametrize(("method", "write_back_bytes"), [("kahan", 12), ("stochastic", 13)])
def test_transient_memory_of_the_step_is_bounded(method, write_back_bytes):
    # While the wrapped optimizer runs, the step holds a float32 weight and gradient per
    # element (8 bytes) beside what that optimizer allocates for float32 parameters;
    # counting lost updates and rounding back take at most 12 (kahan) or 13 (stochastic).
    elements_per_tensor, tensors = 1 << 20, 8

    def peak_extra_bytes(dtype, wrap):
        params = [
            torch.nn.Parameter(torch.randn(elements_per_tensor, device="cuda").to(dtype))
            for _ in range(tensors)
        ]
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        opt = compensated(opt, method) if wrap else opt
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # creates the state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    elements = elements_per_tensor * tensors
    inner_float32 = peak_extra_bytes(torch.float32, wrap=False)
    wrapped = peak_extra_bytes(torch.bfloat16, wrap=True)
    bound = max(8 * elements + inner_float32, write_back_bytes * elements)
    counting_scratch = 9 * (1 << 22)  # bool mask + int64 copy of one 2**22-element chunk
    assert wrapped <= bound + counting_scratch + (1 << 20)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_rejects_what_is_not_an_optimizer():
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        compensated([torch.nn.Parameter(torch.randn(2).bfloat16())])


def test_rejects_an_unknown_method():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(2).bfloat16())], lr=1.0)
    with pytest.raises(ValueError, match="method"):
        compensated(opt, "pairwise")


def test_rejects_a_generator_of_the_wrong_type():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(2).bfloat16())], lr=1.0)
    with pytest.raises(TypeError, match="generator"):
        compensated(opt, "stochastic", generator=1234)


def test_rejects_wrapping_twice():
    opt = compensated(torch.optim.SGD([torch.nn.Parameter(torch.randn(2).bfloat16())], lr=1.0))
    with pytest.raises(ValueError, match="already compensated"):
        compensated(opt)


def test_rejects_complex_parameters():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))], lr=1.0)
    with pytest.raises(TypeError, match="complex64"):
        compensated(opt)


def test_rejects_a_complex_parameter_group_added_later():
    opt = compensated(torch.optim.SGD([torch.nn.Parameter(torch.randn(2).bfloat16())], lr=1.0))
    with pytest.raises(TypeError, match="complex64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, dtype=torch.cfloat))]})


def test_warns_when_nothing_is_low_precision():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=1.0)
    with pytest.warns(UserWarning, match="no float16/bfloat16"):
        compensated(opt)


def test_does_not_warn_for_a_low_precision_model():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(2).bfloat16())], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compensated(opt)
