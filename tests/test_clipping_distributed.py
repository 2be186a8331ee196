"""Clipping across two gloo ranks on CPU: DDP, FSDP2 (fully_shard) and disjoint parameters.

References are computed here, in one process, in float64 with PyTorch's own
clip_grad_norm_ on the full model and the full batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from finite.clipping import clip_grad_norm_, total_norm
from finite.scaling import LossScaler
from gloo_ranks import run_on_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

WORLD_SIZE = 2
MAX_NORM = 0.05
INF = float("inf")


def make_model(dtype=torch.float32):
    # Rows 7 and 3 split unevenly over two ranks: shards of 4 + 3 and 2 + 1 rows.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    return model.to(dtype)


def rank_batch(rank, dtype=torch.float32):
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 5, generator=generator).to(dtype)


def loss_of(model, x):
    return model(x).square().mean() * 10


def disjoint_tensor(rank):
    """What rank ``rank`` holds in the disjoint-parameter (pipeline-like) checks."""
    generator = torch.Generator().manual_seed(200 + rank)
    return torch.randn(4 + rank, generator=generator)


# ----------------------------------------------------------------------------- on each rank
def ddp_checks(rank):
    results = {}
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    loss_of(model, rank_batch(rank)).backward()
    results["ddp_norm"] = clip_grad_norm_(model.parameters(), MAX_NORM)
    results["ddp_grads"] = [p.grad.clone() for p in model.parameters()]

    model = torch.nn.parallel.DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**8, process_group="default")
    scaler.scale(loss_of(model, rank_batch(rank))).backward()
    results["ddp_fused_norm"] = scaler.unscale_(optimizer, clip_norm=MAX_NORM)
    results["ddp_fused_grads"] = [p.grad.clone() for p in model.parameters()]
    results["ddp_fused_stepped"] = scaler.step(optimizer)
    scaler.update()

    # A non-finite gradient on rank 1 only, after DDP's all-reduce.
    optimizer.zero_grad()
    scaler.scale(loss_of(model, rank_batch(rank))).backward()
    if rank == 1:
        model.module[0].weight.grad[0, 0] = INF
    norm = scaler.unscale_(optimizer, clip_norm=MAX_NORM)
    results["ddp_poisoned_norm_finite"] = bool(norm.isfinite())
    results["ddp_poisoned_stepped"] = scaler.step(optimizer)
    scaler.update()
    results["ddp_poisoned_scale"] = scaler.get_scale()
    results["ddp_params"] = [p.detach().clone() for p in model.parameters()]
    return results


def sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_checks(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    results = {}
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = sharded_model(mesh)
    loss_of(model, rank_batch(rank)).backward()
    grads = [p.grad for p in model.parameters()]
    results["fsdp_grads_are_dtensors"] = all(isinstance(g, DTensor) for g in grads)
    results["fsdp_total_norms"] = {p: total_norm(grads, p) for p in (1.0, 2.0, INF)}
    norm = clip_grad_norm_(model.parameters(), MAX_NORM)
    results["fsdp_norm_type"] = type(norm).__name__
    results["fsdp_norm"] = norm
    results["fsdp_grads"] = [p.grad.full_tensor() for p in model.parameters()]

    model = sharded_model(mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the reference's weights
    scaler = LossScaler(init_scale=2.0**8, process_group="default")
    scaler.scale(loss_of(model, rank_batch(rank))).backward()
    results["fsdp_fused_norm"] = scaler.unscale_(optimizer, clip_norm=MAX_NORM)
    results["fsdp_fused_grads"] = [p.grad.full_tensor() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()

    # Unscaling alone works shard by shard.
    optimizer.zero_grad()
    scaler.scale(loss_of(model, rank_batch(rank))).backward()
    scaler.unscale_(optimizer)
    results["fsdp_unscaled_grads"] = [p.grad.full_tensor() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()

    # A non-finite value in rank 1's shard: every rank's norm of the full gradient is inf.
    optimizer.zero_grad()
    scaler.scale(loss_of(model, rank_batch(rank))).backward()
    if rank == 1:
        model[2].weight.grad.to_local()[0, 0] = INF
    results["fsdp_poisoned_plain_norm"] = total_norm([p.grad for p in model.parameters()])
    results["fsdp_poisoned_inf_norm"] = total_norm([p.grad for p in model.parameters()], INF)
    results["fsdp_poisoned_fused_norm"] = scaler.unscale_(optimizer, clip_norm=MAX_NORM)
    results["fsdp_poisoned_stepped"] = scaler.step(optimizer)
    scaler.update()
    return results


def disjoint_checks(rank):
    results = {}
    group = dist.new_group(list(range(WORLD_SIZE)))
    mine = disjoint_tensor(rank)
    results["disjoint_norms"] = {
        p: total_norm([mine], p, process_group=group) for p in (1.0, 2.0, 3.0, INF)
    }
    param = torch.nn.Parameter(torch.zeros_like(mine))
    param.grad = mine.clone()
    results["disjoint_clip_norm"] = clip_grad_norm_([param], MAX_NORM, process_group=group)
    results["disjoint_clipped"] = param.grad.clone()
    # A rank without tensors still takes part, and contributes nothing.
    results["one_empty_rank"] = total_norm([mine] if rank == 0 else [], process_group=group)
    poisoned = mine.clone()
    if rank == 0:
        poisoned[1] = math.nan
    try:
        total_norm([mine], 0.0, process_group=group)
    except ValueError as error:
        results["zero_order_error"] = str(error)
    results["disjoint_nan_norms"] = {
        p: total_norm([poisoned], p, process_group=group) for p in (2.0, INF)
    }
    return results


def checks(rank: int) -> dict:
    """This rank's results, run inside the gloo group."""
    results = {**ddp_checks(rank), **fsdp_checks(rank), **disjoint_checks(rank)}
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clipping_distributed")
    return run_on_ranks(checks, directory, world_size=WORLD_SIZE)


# ----------------------------------------------------------------------------- references
@pytest.fixture(scope="module")
def reference():
    """float64, one process: the gradient of the mean of the ranks' losses (what DDP and
    FSDP2 average to), its norms, and torch's clipped gradients."""
    model = make_model(torch.float64)
    losses = [loss_of(model, rank_batch(r, torch.float64)) for r in range(WORLD_SIZE)]
    (sum(losses) / WORLD_SIZE).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norms = {p: torch.nn.utils.get_total_norm(grads, p).item() for p in (1.0, 2.0, INF)}
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    clipped = [p.grad.clone() for p in model.parameters()]
    return {"norms": norms, "grads": grads, "clipped": clipped}


def assert_close_to(values, expected, rel=1e-6):
    # float32 against float64: elements that cancel are compared to the tensor's scale.
    for value, target in zip(values, expected, strict=True):
        scale = target.abs().max().item()
        torch.testing.assert_close(value.double(), target, rtol=rel, atol=rel * scale)


# ----------------------------------------------------------------------------- DDP
def test_ddp_every_rank_gets_the_same_norm_and_clipped_gradients(rank_results):
    first, second = rank_results
    assert torch.equal(first["ddp_norm"], second["ddp_norm"])
    for a, b in zip(first["ddp_grads"], second["ddp_grads"], strict=True):
        assert torch.equal(a, b)


def test_ddp_norm_and_clipped_gradients_equal_the_single_process_reference(rank_results, reference):
    for results in rank_results:
        assert results["ddp_norm"].item() == pytest.approx(reference["norms"][2.0], rel=1e-6)
        assert_close_to(results["ddp_grads"], reference["clipped"])


def test_ddp_fused_unscale_and_clip_agrees_across_ranks_and_with_the_reference(
    rank_results, reference
):
    first, second = rank_results
    assert torch.equal(first["ddp_fused_norm"], second["ddp_fused_norm"])
    assert first["ddp_fused_norm"].item() == pytest.approx(reference["norms"][2.0], rel=1e-6)
    for results in rank_results:
        assert_close_to(results["ddp_fused_grads"], reference["clipped"])
        assert results["ddp_fused_stepped"] is True


def test_ddp_nonfinite_gradient_on_one_rank_makes_every_rank_skip(rank_results):
    assert [r["ddp_poisoned_norm_finite"] for r in rank_results] == [True, False]
    assert [r["ddp_poisoned_stepped"] for r in rank_results] == [False, False]
    assert [r["ddp_poisoned_scale"] for r in rank_results] == [2.0**7, 2.0**7]
    for a, b in zip(rank_results[0]["ddp_params"], rank_results[1]["ddp_params"], strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- FSDP2
def test_fsdp_gradients_are_dtensors(rank_results):
    assert all(r["fsdp_grads_are_dtensors"] for r in rank_results)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_fsdp_total_norm_equals_the_norm_of_the_full_gradients(rank_results, reference, norm_type):
    for results in rank_results:
        value = results["fsdp_total_norms"][norm_type].item()
        assert value == pytest.approx(reference["norms"][norm_type], rel=1e-6)


def test_fsdp_clip_grad_norm_returns_a_plain_tensor_equal_on_every_rank(rank_results):
    assert [r["fsdp_norm_type"] for r in rank_results] == ["Tensor", "Tensor"]
    assert torch.equal(rank_results[0]["fsdp_norm"], rank_results[1]["fsdp_norm"])


def test_fsdp_clip_grad_norm_equals_the_single_process_reference(rank_results, reference):
    for results in rank_results:
        assert results["fsdp_norm"].item() == pytest.approx(reference["norms"][2.0], rel=1e-6)
        assert_close_to(results["fsdp_grads"], reference["clipped"])


def test_fsdp_fused_unscale_and_clip_equals_the_single_process_reference(rank_results, reference):
    for results in rank_results:
        norm = results["fsdp_fused_norm"].item()
        assert norm == pytest.approx(reference["norms"][2.0], rel=1e-6)
        assert_close_to(results["fsdp_fused_grads"], reference["clipped"])


def test_fsdp_loss_scaler_unscales_sharded_gradients(rank_results, reference):
    for results in rank_results:
        assert_close_to(results["fsdp_unscaled_grads"], reference["grads"])


def test_fsdp_nonfinite_shard_on_one_rank_makes_every_norm_nonfinite_and_every_rank_skip(
    rank_results,
):
    for results in rank_results:
        assert results["fsdp_poisoned_plain_norm"].item() == INF
        assert results["fsdp_poisoned_inf_norm"].item() == INF
        assert results["fsdp_poisoned_fused_norm"].item() == INF
        assert results["fsdp_poisoned_stepped"] is False


# ----------------------------------------------------------------------------- process_group
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, INF])
def test_process_group_combines_the_norms_of_disjoint_tensors(rank_results, norm_type):
    everything = torch.cat([disjoint_tensor(r).double() for r in range(WORLD_SIZE)])
    expected = torch.linalg.vector_norm(everything, norm_type).item()
    for results in rank_results:
        assert results["disjoint_norms"][norm_type].item() == pytest.approx(expected, rel=1e-6)


def test_process_group_clips_every_rank_with_the_global_norm(rank_results):
    everything = torch.cat([disjoint_tensor(r).double() for r in range(WORLD_SIZE)])
    norm = torch.linalg.vector_norm(everything).item()
    for rank, results in enumerate(rank_results):
        assert results["disjoint_clip_norm"].item() == pytest.approx(norm, rel=1e-6)
        expected = disjoint_tensor(rank).double() * (MAX_NORM / (norm + 1e-6))
        torch.testing.assert_close(
            results["disjoint_clipped"].double(), expected, rtol=1e-6, atol=0
        )


def test_a_rank_without_tensors_takes_part_in_the_reduction(rank_results):
    expected = torch.linalg.vector_norm(disjoint_tensor(0).double()).item()
    for results in rank_results:
        assert results["one_empty_rank"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_nan_on_one_rank_reaches_every_rank(rank_results, norm_type):
    for results in rank_results:
        assert math.isnan(results["disjoint_nan_norms"][norm_type].item())


def test_orders_without_an_identity_for_empty_ranks_are_rejected_across_ranks(rank_results):
    for results in rank_results:
        assert "norm_type must be positive" in results.get("zero_order_error", "")
