"""LossScaler across two gloo ranks on CPU: every rank skips and backs off together."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from finite.scaling import LossScaler
from gloo_ranks import run_on_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

INF = float("inf")


def one_iteration(model, optimizer, scaler, rank, poisoned_rank=None, grad_size=1.0):
    optimizer.zero_grad()
    x = torch.full((4, 3), grad_size)
    scaler.scale(model(x).sum()).backward()
    if rank == poisoned_rank:
        model.weight.grad[0, 0] = INF
    stepped = scaler.step(optimizer)
    scaler.update()
    return stepped


def replica(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def checks(rank: int) -> dict:
    """This rank's results, run inside the gloo group."""
    results = {}
    model, optimizer = replica()
    agreeing = LossScaler(init_scale=2.0**10, process_group="default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["agreeing_steps"] = [
            one_iteration(model, optimizer, agreeing, rank),
            one_iteration(model, optimizer, agreeing, rank, poisoned_rank=1),
        ]
    results["agreeing_warnings"] = [str(w.message) for w in caught]
    results["agreeing_scale"] = agreeing.get_scale()
    results["agreeing_reason"] = agreeing.history[-1].reason
    results["params"] = [p.detach().clone() for p in model.parameters()]

    # Headroom: the next scale comes from the largest gradient over all ranks.
    model, optimizer = replica()
    headroom = LossScaler(strategy="headroom", process_group=dist.new_group([0, 1]))
    one_iteration(model, optimizer, headroom, rank, grad_size=4.0 if rank == 1 else 1.0)
    results["headroom_scale"] = headroom.get_scale()

    # A veto on rank 1 only (a spike in its own loss) skips the step on every rank.
    model, optimizer = replica()
    vetoing = LossScaler(init_scale=2.0**10, process_group="default")
    optimizer.zero_grad()
    vetoing.scale(model(torch.ones(4, 3)).sum()).backward()
    results["veto_stepped"] = vetoing.step(
        optimizer, veto=torch.tensor(rank == 1), veto_reason="spike"
    )
    vetoing.update()
    results["veto_record"] = tuple(vetoing.history[-1])
    results["veto_params"] = [p.detach().clone() for p in model.parameters()]

    model, optimizer = replica()
    unaware = LossScaler(init_scale=2.0**10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["unaware_steps"] = [
            one_iteration(model, optimizer, unaware, rank, poisoned_rank=1),
            one_iteration(model, optimizer, unaware, rank, poisoned_rank=1),
        ]
    results["unaware_warnings"] = [str(w.message) for w in caught]
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scaling_distributed")
    return run_on_ranks(checks, directory)


def test_inf_on_one_rank_makes_every_rank_skip(rank_results):
    assert [r["agreeing_steps"] for r in rank_results] == [[True, False], [True, False]]


def test_every_rank_backs_off_to_the_same_scale(rank_results):
    assert [r["agreeing_scale"] for r in rank_results] == [2.0**9, 2.0**9]


def test_replicas_stay_bit_identical(rank_results):
    for a, b in zip(rank_results[0]["params"], rank_results[1]["params"], strict=True):
        assert torch.equal(a, b)


def test_history_says_which_rank_overflowed(rank_results):
    assert [r["agreeing_reason"] for r in rank_results] == ["other rank", "inf"]


def test_agreeing_scaler_does_not_warn(rank_results):
    assert all(r["agreeing_warnings"] == [] for r in rank_results)


def test_headroom_scale_comes_from_the_global_largest_gradient(rank_results):
    # Gradient of sum(W x + b) w.r.t. W is sum over the batch of x: 4 rows of 4.0 on rank 1.
    # Rank 0 alone (largest 4.0) would choose 2**(13 - 4).
    largest = 16.0
    assert largest * 2.0**11 <= 65504 < largest * 2.0**12
    expected = 2.0 ** (11 - 4)  # 4 margin bits below the largest power that fits
    assert [r["headroom_scale"] for r in rank_results] == [expected, expected]


def test_without_process_group_ranks_disagree_and_a_warning_fires_once(rank_results):
    assert [r["unaware_steps"] for r in rank_results] == [[True, True], [False, False]]
    for r in rank_results:
        assert len(r["unaware_warnings"]) == 1
        assert "process_group" in r["unaware_warnings"][0]


def test_a_veto_on_one_rank_skips_the_step_on_every_rank(rank_results):
    assert [r["veto_stepped"] for r in rank_results] == [False, False]
    assert [r["veto_record"] for r in rank_results] == [(0, 2.0**10, True, "spike")] * 2
    initial = [p.detach() for p in replica()[0].parameters()]
    for r in rank_results:
        assert all(torch.equal(a, b) for a, b in zip(r["veto_params"], initial, strict=True))
