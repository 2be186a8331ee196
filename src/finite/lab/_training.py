"""The small pieces every scenario shares: seeded synthetic data and a monitored loop."""

from __future__ import annotations

from collections.abc import Callable

import torch

from finite.monitor import Monitor

Batch = tuple[torch.Tensor, torch.Tensor]


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with ``seed``: every batch is reproducible on its own."""
    return torch.Generator().manual_seed(seed)


def regression_batches(
    batch: int, dim: int, target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Callable[[int], Batch]:
    """Batch ``i`` is ``x ~ N(0, 1)`` of shape (batch, dim) and ``target(x, w)``, w fixed."""
    w = torch.randn(dim, 1, generator=seeded(123))

    def batches(i: int) -> Batch:
        x = torch.randn(batch, dim, generator=seeded(i))
        return x, target(x, w)

    return batches


def classification_batches(batch: int, dim: int, classes: int) -> Callable[[int], Batch]:
    """Batch ``i`` is ``x ~ N(0, 1)`` and a class label linear in x (learnable)."""
    w = torch.randn(dim, classes, generator=seeded(123))

    def batches(i: int) -> Batch:
        x = torch.randn(batch, dim, generator=seeded(i))
        return x, (x @ w).argmax(dim=1)

    return batches


def monitor(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, **kwargs) -> Monitor:
    """A Monitor as the lab uses it: statistics every step, no histograms, no files."""
    kwargs.setdefault("histograms_every", 0)
    kwargs.setdefault("sync_every", 50)
    return Monitor(model, optimizer, **kwargs)
