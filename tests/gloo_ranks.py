"""Run a test's checks in several CPU processes joined by a gloo process group."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(
    checks: Callable[[int], dict],
    directory: Path,
    *,
    world_size: int = 2,
    timeout_s: float = 30,
    weights_only: bool = True,
) -> list[dict]:
    """``checks(rank)`` on every rank of a ``world_size`` gloo group; each rank's result.

    ``checks`` must be a module-level function (the ranks are spawned processes). Each
    result is saved with ``torch.save`` in ``directory`` and loaded back here.
    """
    mp.spawn(
        _rank,
        args=(checks, str(directory), world_size, timeout_s),
        nprocs=world_size,
        join=True,
    )
    return [
        torch.load(directory / f"rank{r}.pt", weights_only=weights_only) for r in range(world_size)
    ]


def _rank(rank: int, checks, directory: str, world_size: int, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(directory, 'init')}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        torch.save(checks(rank), os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
