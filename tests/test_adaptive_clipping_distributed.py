"""ZClip, AutoClip, AGC and SpikeGuard across two gloo ranks on CPU (DDP and FSDP2).

Every rank must take the same decision, and a sharded model must be clipped as the
whole model would be in a single process.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from finite.clipping.agc import AGC
from finite.clipping.autoclip import AutoClip
from finite.clipping.spike_guard import SpikeGuard
from finite.clipping.zclip import ZClip
from gloo_ranks import run_on_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

WORLD_SIZE = 2
STEPS = 14
SPIKE_STEPS = (8, 11)  # the loss is weighted 30x: loss and gradient norm jump


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 4),
    )
    with torch.no_grad():
        # Vectors of norm ~12: their AGC ratios stay small, so the largest ratio is a row
        # of the last weight, held by rank 1 alone under FSDP2.
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(3.0 + torch.randn(param.shape))
    return model


def batch(step: int) -> torch.Tensor:
    """The global batch of a step (16 rows), the same on every rank."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=generator)


def backward(model: torch.nn.Module, step: int, x: torch.Tensor, forward=None) -> torch.Tensor:
    """Gradients of the mean squared output; ``forward`` is the wrapper (DDP) if any."""
    model.zero_grad(set_to_none=True)
    weight = 30.0 if step in SPIKE_STEPS else 1.0
    loss = weight * (forward or model)(x).square().mean()
    loss.backward()
    return loss.detach()


def full_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    grads = []
    for param in model.parameters():
        grad = param.grad
        grads.append(grad.full_tensor() if hasattr(grad, "full_tensor") else grad.clone())
    return grads


def clippers():
    return {
        "zclip": ZClip(warmup_steps=4, max_grad_norm=None),
        "autoclip": AutoClip(percentile=25.0),
        "agc": AGC(clipping=0.02),
    }


def run(model, clipper, rank, world, poisoned_step=None, poisoned_rank=None, forward=None):
    """Clip ``STEPS`` gradients (each rank on its slice of the batch); the results, the
    clipped gradients and the rank's loss per step."""
    results, grads, losses = [], [], []
    for step in range(STEPS):
        x = batch(step)[rank::world]
        losses.append(backward(model, step, x, forward))
        if step == poisoned_step and rank == poisoned_rank:
            grad = model[0].weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.view(-1)[0] = math.inf
        result = clipper(model.named_parameters() if isinstance(clipper, AGC) else model)
        results.append(tuple(t.detach().clone() for t in result))
        grads.append(full_grads(model))
    return results, grads, losses


def fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2], model[3]):
        fully_shard(layer)
    fully_shard(model)
    return model


def checks(rank: int) -> dict:
    """This rank's results, run inside the gloo group."""
    out: dict[str, object] = {}
    for name in clippers():
        if rank == 0:  # the reference: a single process on the whole batch
            out[f"reference_{name}"] = run(make_model(), clippers()[name], rank=0, world=1)
        out[f"fsdp_{name}"] = run(fsdp_model(), clippers()[name], rank, WORLD_SIZE)
        ddp = torch.nn.parallel.DistributedDataParallel(make_model())
        out[f"ddp_{name}"] = run(ddp.module, clippers()[name], rank, WORLD_SIZE, forward=ddp)

    # A non-finite gradient on rank 1 only, in a sharded model.
    out["poisoned_zclip"] = run(
        fsdp_model(), ZClip(warmup_steps=4), rank, WORLD_SIZE, poisoned_step=6, poisoned_rank=1
    )

    # SpikeGuard on the sharded run's global gradient norms, and on its per-rank losses
    # averaged by the guard itself.
    results, _, losses = out["fsdp_zclip"]
    norm_guard = SpikeGuard("grad_norm", sigma=3.0, window=8, min_history=4)
    loss_guard = SpikeGuard(
        "loss", sigma=3.0, window=8, min_history=4, process_group=dist.group.WORLD
    )
    out["norm_flags"] = torch.stack([norm_guard(norm) for norm, _, _ in results])
    out["loss_flags"] = torch.stack([loss_guard(loss) for loss in losses])
    out["losses"] = torch.stack(losses)
    return out


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adaptive_clipping_distributed")
    return run_on_ranks(checks, directory, world_size=WORLD_SIZE, timeout_s=60, weights_only=False)


def assert_identical(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, (list, tuple)):
            assert_identical(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["zclip", "autoclip", "agc"])
@pytest.mark.parametrize("wrapper", ["fsdp", "ddp"])
def test_every_rank_takes_the_same_decisions(rank_results, wrapper, name):
    results = [r[f"{wrapper}_{name}"][0] for r in rank_results]
    assert_identical(results[0], results[1])


@pytest.mark.parametrize("name", ["zclip", "autoclip", "agc"])
@pytest.mark.parametrize("wrapper", ["fsdp", "ddp"])
def test_sharded_and_replicated_models_clip_as_the_whole_model_would(rank_results, wrapper, name):
    expected_results, expected_grads, _ = rank_results[0][f"reference_{name}"]
    results, grads, _ = rank_results[0][f"{wrapper}_{name}"]
    assert any(bool(r[2]) for r in expected_results), "the run exercises clipping"
    if name != "agc":  # AGC clips some unit at every step
        assert not all(bool(r[2]) for r in expected_results), "and steps that are not clipped"
    for step, (want, got) in enumerate(zip(expected_results, results, strict=True)):
        assert bool(got[2]) == bool(want[2]), f"step {step}: clipped"
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0, msg=f"step {step}")
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0, msg=f"step {step}")
    for step, (want, got) in enumerate(zip(expected_grads, grads, strict=True)):
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=f"step {step}")


def test_a_nonfinite_gradient_on_one_rank_is_seen_by_every_rank(rank_results):
    runs = [r["poisoned_zclip"][0] for r in rank_results]
    assert_identical(runs[0], runs[1])
    norm, _, clipped = runs[0][6]
    assert not math.isfinite(norm.item()) and not bool(clipped)


def test_spike_guard_on_the_global_norm_agrees_across_ranks(rank_results):
    flags = [r["norm_flags"] for r in rank_results]
    assert torch.equal(flags[0], flags[1])
    assert flags[0][SPIKE_STEPS[0]].item(), "the first spike is flagged"


def test_spike_guard_averages_per_rank_losses_over_its_process_group(rank_results):
    flags = [r["loss_flags"] for r in rank_results]
    assert torch.equal(flags[0], flags[1])
    assert not torch.equal(rank_results[0]["losses"], rank_results[1]["losses"]), "ranks differ"
    mean_loss = (rank_results[0]["losses"] + rank_results[1]["losses"]).double() / 2
    reference = SpikeGuard("loss", sigma=3.0, window=8, min_history=4)
    expected = torch.stack([reference(v) for v in mean_loss])
    assert torch.equal(flags[0], expected)
    assert expected[SPIKE_STEPS[0]].item()
