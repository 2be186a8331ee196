"""StableStep against the same step written by hand with plain PyTorch and the components."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finite.clipping.agc import AGC
from finite.clipping.spike_guard import SpikeGuard
from finite.clipping.zclip import ZClip
from finite.precision.master_weights import MasterWeights
from finite.scaling.loss_scaler import LossScaler
from finite.step import StableStep, StepResult
from host_reads import counted_host_reads

IN, OUT = 6, 3


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, OUT))
    return model.to(dtype)


def batches(count, size=8, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, IN, generator=generator).to(dtype),
            torch.randn(size, OUT, generator=generator).to(dtype),
        )
        for _ in range(count)
    ]


def mse(model, batch, factor=1.0):
    x, y = batch
    return (model(x).float() - y.float()).square().mean() * factor


def make_adam(model, lr=1e-2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return optimizer, scheduler


def assert_bitwise_equal(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


def snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_unchanged(model, optimizer, saved):
    params, opt_state = saved
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    now = optimizer.state_dict()
    assert now["param_groups"] == opt_state["param_groups"]
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            assert torch.equal(now["state"][index][key], value), (index, key)


# ----------------------------------------------------------------------------- the loop
def test_equals_hand_written_loop_with_torch_clipping_and_scheduler():
    data = batches(6)
    ours, theirs = make_model(), make_model()
    opt_a, sched_a = make_adam(ours)
    opt_b, sched_b = make_adam(theirs)
    step = StableStep(ours, opt_a, clip=0.5, scheduler=sched_a)
    for batch in data:
        result = step(mse(ours, batch))
        loss = mse(theirs, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        if torch.isfinite(norm):
            opt_b.step()
            sched_b.step()
        opt_b.zero_grad()
        assert result.stepped and result.skip_reason is None
        assert torch.equal(result.loss, loss.detach())
        assert torch.equal(result.grad_norm, norm)
    assert_bitwise_equal(ours, theirs)
    assert sched_a.last_epoch == sched_b.last_epoch == 6


def test_equals_hand_written_loop_with_torch_grad_scaler():
    data = batches(6)
    ours, theirs = make_model(), make_model()
    opt_a, sched_a = make_adam(ours)
    opt_b, sched_b = make_adam(theirs)
    scaler = LossScaler(init_scale=2.0**10, growth_interval=2)
    step = StableStep(ours, opt_a, scaler=scaler, clip=0.5, scheduler=sched_a)
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for batch in data:
        result = step(mse(ours, batch))
        reference.scale(mse(theirs, batch)).backward()
        reference.unscale_(opt_b)
        norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        scale_used = reference.get_scale()
        before = reference.get_scale()
        reference.step(opt_b)
        reference.update()
        stepped = reference.get_scale() >= before
        if stepped:
            sched_b.step()
        opt_b.zero_grad()
        assert result.stepped == stepped
        assert result.scale.item() == scale_used
        assert torch.equal(result.grad_norm, norm)
    assert_bitwise_equal(ours, theirs)
    assert scaler.get_scale() == reference.get_scale() == 2.0**13


def test_clip_float_equals_torch_clip_grad_norm_path():
    ours, theirs = make_model(), make_model()
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.1)
    batch = batches(1)[0]
    result = StableStep(ours, opt_a, clip=1e-3)(mse(ours, batch, factor=100.0))
    mse(theirs, batch, factor=100.0).backward()
    norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1e-3)
    opt_b.step()
    assert bool(result.clipped) and bool(norm > 1e-3)
    torch.testing.assert_close(result.grad_norm, norm, rtol=1e-6, atol=0)
    for x, y in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_zclip_equals_hand_written_zclip_loop():
    data = batches(5)
    ours, theirs = make_model(), make_model()
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.1)
    step = StableStep(ours, opt_a, clip=ZClip(warmup_steps=2))
    clipper = ZClip(warmup_steps=2)
    for batch in data:
        result = step(mse(ours, batch))
        mse(theirs, batch).backward()
        expected = clipper(list(theirs.parameters()))
        opt_b.step()
        opt_b.zero_grad()
        assert torch.equal(result.grad_norm, expected.norm)
        assert torch.equal(result.clipped, expected.clipped)
    assert_bitwise_equal(ours, theirs)


def test_agc_gets_module_names_for_exclude():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = StableStep(model, optimizer, clip=AGC(clipping=1e-4, exclude=("2.bias",)))
    result = step(mse(model, batches(1)[0], factor=100.0))
    assert result.stepped and bool(result.clipped)


# ----------------------------------------------------------------------------- skipping
@pytest.mark.parametrize("with_scaler", [False, True])
def test_planted_inf_skips_and_leaves_params_optimizer_and_scheduler(with_scaler):
    model = make_model()
    optimizer, scheduler = make_adam(model)
    scaler = LossScaler(init_scale=2.0**8) if with_scaler else None
    step = StableStep(model, optimizer, scaler=scaler, clip=1.0, scheduler=scheduler)
    data = batches(4)
    for batch in data[:3]:
        step(mse(model, batch))
    saved = snapshot(model, optimizer)
    epoch, lr = scheduler.last_epoch, optimizer.param_groups[0]["lr"]
    x, y = data[3]
    x = x.clone()
    x[0, 0] = math.inf
    result = step(mse(model, (x, y)))
    assert not result.stepped
    assert result.skip_reason == "nonfinite"
    assert_unchanged(model, optimizer, saved)
    assert scheduler.last_epoch == epoch and optimizer.param_groups[0]["lr"] == lr
    assert all(p.grad is None for p in model.parameters())
    assert step.skipped_steps == 1 and step.optimizer_steps == 3


def test_nonfinite_loss_without_gradient_path_skips():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = snapshot(model, optimizer)
    loss = mse(model, batches(1)[0]) + torch.tensor(math.nan)
    result = StableStep(model, optimizer)(loss)
    assert (result.stepped, result.skip_reason) == (False, "nonfinite")
    assert_unchanged(model, optimizer, saved)


def spiking_run(scaler):
    model = make_model()
    optimizer, scheduler = make_adam(model)
    guard = SpikeGuard(window=8, min_history=4)
    step = StableStep(model, optimizer, scaler=scaler, guard=guard, scheduler=scheduler)
    data = batches(6)
    for batch in data[:5]:
        assert step(mse(model, batch)).stepped
    return model, optimizer, scheduler, step, data[5]


def test_spike_veto_skips_without_changing_scale():
    scaler = LossScaler(init_scale=2.0**8, growth_interval=3)
    model, optimizer, scheduler, step, batch = spiking_run(scaler)
    scale, tracker = scaler.get_scale(), scaler.state_dict()["_growth_tracker"]
    saved, epoch = snapshot(model, optimizer), scheduler.last_epoch
    result = step(mse(model, batch, factor=1e4))
    assert (result.stepped, result.skip_reason) == (False, "spike")
    assert scaler.get_scale() == scale == result.scale.item()
    assert scaler.state_dict()["_growth_tracker"] == tracker
    assert_unchanged(model, optimizer, saved)
    assert scheduler.last_epoch == epoch


def test_spike_veto_without_scaler():
    model, optimizer, scheduler, step, batch = spiking_run(None)
    saved, epoch = snapshot(model, optimizer), scheduler.last_epoch
    result = step(mse(model, batch, factor=1e4))
    assert (result.stepped, result.skip_reason) == (False, "spike")
    assert_unchanged(model, optimizer, saved)
    assert scheduler.last_epoch == epoch


def test_one_host_read_per_step_with_scaler_clip_and_guard():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**8)
    step = StableStep(model, optimizer, scaler=scaler, clip=1.0, guard=SpikeGuard(), scheduler=None)
    losses = [mse(model, batch) for batch in batches(1)]
    with counted_host_reads() as counts:
        step(losses[0])
    assert sum(counts.values()) == 1, counts


def test_one_host_read_per_step_without_scaler():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = StableStep(model, optimizer, clip=1.0, guard=SpikeGuard())
    loss = mse(model, batches(1)[0])
    with counted_host_reads() as counts:
        step(loss)
    assert sum(counts.values()) == 1, counts


# ----------------------------------------------------------------------------- accumulation
def test_accumulation_equals_one_big_batch():
    micro = batches(4, size=8)
    big = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
    ours, theirs = make_model(), make_model()
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.1)
    step = StableStep(ours, opt_a, accumulation_steps=4)
    results = [step(mse(ours, batch)) for batch in micro]
    loss = mse(theirs, big)
    loss.backward()
    opt_b.step()
    assert [(r.stepped, r.skip_reason) for r in results] == [(False, None)] * 3 + [(True, None)]
    assert all(r.grad_norm is None and r.clipped is None for r in results[:3])
    torch.testing.assert_close(results[-1].loss, loss.detach(), rtol=2e-7, atol=0)
    for x, y in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_accumulation_with_master_weights_equals_hand_written_fp32_loop():
    data = batches(6, dtype=torch.bfloat16)
    ours, theirs = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
    mw_a, mw_b = MasterWeights(ours.parameters()), MasterWeights(theirs.parameters())
    opt_a = torch.optim.SGD(mw_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(mw_b.parameters(), lr=0.1)
    step = StableStep(ours, opt_a, master_weights=mw_a, accumulation_steps=3)
    for start in (0, 3):
        for batch in data[start : start + 3]:
            step(mse(ours, batch))
            (mse(theirs, batch) / 3).backward()
            mw_b.accumulate_grads_()
        assert all(p.grad.dtype == torch.float32 for p in mw_b.parameters())
        opt_b.step()
        mw_b.copy_to_model_()
        mw_b.zero_grad()
    for x, y in zip(mw_a.parameters(), mw_b.parameters(), strict=True):
        assert torch.equal(x, y)
    assert_bitwise_equal(ours, theirs)


def test_state_dict_inside_accumulation_window_raises():
    model = make_model()
    step = StableStep(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    step(mse(model, batches(1)[0]))
    with pytest.raises(RuntimeError, match="1 of 2 micro-batches"):
        step.state_dict()


# ----------------------------------------------------------------------------- resuming
def full_setup():
    model = make_model()
    optimizer, scheduler = make_adam(model)
    step = StableStep(
        model,
        optimizer,
        scaler=LossScaler(init_scale=2.0**8, growth_interval=2),
        clip=ZClip(warmup_steps=2),
        guard=SpikeGuard(window=4, min_history=2),
        scheduler=scheduler,
        accumulation_steps=2,
    )
    return model, step


def test_resumed_run_continues_bit_for_bit():
    data = batches(16)
    model, step = full_setup()
    for batch in data[:8]:
        step(mse(model, batch))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "step": step.state_dict()}, buffer)
    for batch in data[8:]:
        step(mse(model, batch))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model, resumed = full_setup()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["step"])
    for batch in data[8:]:
        resumed(mse(resumed_model, batch))
    assert_bitwise_equal(model, resumed_model)
    a, b = step.state_dict(), resumed.state_dict()
    assert (
        a["counters"]
        == b["counters"]
        == {
            "iterations": 8,
            "optimizer_steps": 8,
            "skipped_steps": 0,
        }
    )
    assert a["scheduler"] == b["scheduler"]
    assert a["scaler"] == b["scaler"]
    for key in ("clipper", "guard"):
        for name, tensor in a[key]["state"].items():
            assert torch.equal(tensor, b[key]["state"][name]), (key, name)


def test_load_state_dict_rejects_mismatched_components():
    model, step = full_setup()
    state = step.state_dict()
    plain = StableStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="scaler"):
        plain.load_state_dict(state)
    with pytest.raises(ValueError, match=re.escape("StableStep.state_dict")):
        plain.load_state_dict({"optimizer": {}})
    with pytest.raises(TypeError, match="mapping"):
        plain.load_state_dict([1])


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def parts():
    model = make_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@given(st.integers(max_value=0))
def test_accumulation_steps_below_one_raises(value):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"accumulation_steps must be >= 1; got {value}"):
        StableStep(model, optimizer, accumulation_steps=value)


@given(st.floats(max_value=-1e-300) | st.just(math.nan))
def test_negative_or_nan_clip_raises(value):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        StableStep(model, optimizer, clip=value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accumulation_steps": 2.0}, "accumulation_steps must be an int, got float"),
        ({"accumulation_steps": True}, "accumulation_steps must be an int, got bool"),
        ({"clip": "1.0"}, "clip must be a float, a ZClip, an AutoClip, an AGC or None, got str"),
        ({"clip": True}, "clip must be a float.*got bool"),
        ({"scaler": torch.amp.GradScaler("cpu")}, "scaler must be a finite.LossScaler"),
        ({"guard": 6.0}, "guard must be a finite.SpikeGuard or None, got float"),
        ({"monitor": object()}, "monitor must be a finite.Monitor or None, got object"),
        ({"master_weights": []}, "master_weights must be finite.MasterWeights or None"),
        ({"scheduler": 3}, "scheduler must have a step\\(\\) method, got int"),
    ],
)
def test_wrong_argument_types_raise(parts, kwargs, message):
    with pytest.raises(TypeError, match=message):
        StableStep(*parts, **kwargs)


def test_wrong_model_or_optimizer_raises(parts):
    model, optimizer = parts
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module, got SGD")):
        StableStep(optimizer, optimizer)
    with pytest.raises(
        TypeError, match=re.escape("optimizer must be a torch.optim.Optimizer, got Sequential")
    ):
        StableStep(model, model)


def test_optimizer_without_master_weights_raises():
    model = make_model(dtype=torch.bfloat16)
    master_weights = MasterWeights(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape("master_weights.parameters")):
        StableStep(model, optimizer, master_weights=master_weights)


def test_bad_loss_raises(parts):
    step = StableStep(*parts)
    with pytest.raises(TypeError, match="loss"):
        step(1.0)
    with pytest.raises(TypeError, match="loss"):
        step(torch.tensor(1))
    with pytest.raises(ValueError, match=r"loss must hold one value, got shape \(2,\)"):
        step(torch.ones(2, requires_grad=True))


def test_result_is_a_named_tuple_with_documented_fields():
    assert StepResult._fields == ("stepped", "skip_reason", "loss", "grad_norm", "clipped", "scale")


def test_monitor_records_one_step_per_accumulation_window():
    from finite.monitor.monitor import Monitor

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, sync_every=1, histograms_every=0) as monitor:
        step = StableStep(model, optimizer, monitor=monitor, accumulation_steps=2)
        for batch in batches(6):
            step(mse(model, batch))
        assert monitor.current_step == 3


def test_monitor_without_the_steps_scaler_is_rejected_naming_both():
    from finite.monitor.monitor import Monitor
    from finite.scaling import LossScaler

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer) as monitor:
        with pytest.raises(ValueError, match="its scaler is None, the step's is LossScaler"):
            StableStep(model, optimizer, scaler=LossScaler(), monitor=monitor)


def test_monitor_marks_the_step_skipped_for_a_nan_loss_without_a_scaler():
    from finite.monitor.monitor import Monitor

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, sync_every=1, histograms_every=0) as monitor:
        step = StableStep(model, optimizer, monitor=monitor)
        for i, batch in enumerate(batches(3)):
            step(mse(model, batch, factor=float("nan") if i == 1 else 1.0))
    assert monitor.history.steps["skipped"].tolist() == [False, True, False]
