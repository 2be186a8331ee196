"""Monitor across two gloo ranks on CPU: each rank records its own shard, rank 0 gathers."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.distributed as dist

from finite.monitor import Monitor
from gloo_ranks import run_on_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

STEPS = 3


def checks(rank: int, result_dir: str) -> dict:
    """This rank's results, run inside the gloo group."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    with Monitor(model, optimizer, log_dir=os.path.join(result_dir, "logs")) as monitor:
        for step in range(STEPS):
            x = torch.full((4, 3), float(rank + 1))  # each rank its own shard
            if rank == 1 and step == 1:
                x[0, 0] = math.nan
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(loss)
            losses.append(loss.item())
        gathered = monitor.gather()
        results = {"rank": monitor.rank, "losses": losses}
        if gathered is not None:
            results["ranks"] = gathered.steps["rank"].tolist()
            results["steps"] = gathered.steps["step"].tolist()
            results["gathered_losses"] = gathered.steps["loss"].tolist()
            results["module_ranks"] = sorted(set(gathered.modules["rank"].tolist()))
            results["events"] = [(e.rank, e.step, e.phase) for e in gathered.events]
        results["gathered_is_none"] = gathered is None
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("monitor_distributed")
    results = run_on_ranks(functools.partial(checks, result_dir=str(directory)), directory)
    return results, directory


def test_each_history_carries_its_rank(rank_results):
    results, _ = rank_results
    assert [r["rank"] for r in results] == [0, 1]


def test_rank_zero_gathers_every_rank_and_the_others_get_none(rank_results):
    results, _ = rank_results
    assert results[0]["ranks"] == [0] * STEPS + [1] * STEPS
    assert results[0]["steps"] == list(range(STEPS)) * 2
    assert results[0]["module_ranks"] == [0, 1]
    assert results[1]["gathered_is_none"]


def test_gathered_rows_are_each_ranks_own(rank_results):
    results, _ = rank_results
    own = results[0]["losses"] + results[1]["losses"]
    gathered = results[0]["gathered_losses"]
    assert all(
        (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)
        for a, b in zip(gathered, own, strict=True)
    )


def test_an_event_on_one_rank_is_reported_with_that_rank(rank_results):
    results, _ = rank_results
    assert (1, 1, "input") in results[0]["events"]
    assert all(rank == 1 for rank, _, _ in results[0]["events"])


def test_each_rank_writes_its_own_history_file(rank_results):
    _, directory = rank_results
    names = sorted(os.listdir(directory / "logs"))
    assert names == ["history.jsonl", "history.rank1.jsonl"]
