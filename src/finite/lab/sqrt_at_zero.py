"""sqrt-at-zero: a distance sqrt(sum((a - b)**2)) where a == b.

A pairwise distance matrix has zeros on its diagonal. The forward pass is fine,
sqrt(0) = 0, but the derivative of sqrt at 0 is 1 / (2 sqrt(0)) = inf, and the chain rule
multiplies it by d(sum of squares) = 2 (a - b) = 0: inf * 0 = NaN in every gradient, from a
finite loss. ``finite.ops.safe_sqrt`` has the same value and a gradient of 0 at 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import ops
from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "sqrt-at-zero"
FAULT = "pairwise distances via sqrt at 0 (the diagonal): the gradient is inf * 0 = NaN"
FIX = "finite.ops.safe_sqrt (same value, gradient 0 at 0)"
EXPECTED = "nonfinite_gradients"

STEPS = 20
POINTS = 16


class DistanceEmbedding(nn.Module):
    """Embeds points so that their pairwise distances match given ones."""

    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 4)
        self.sqrt = ops.safe_sqrt if fixed else torch.sqrt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        squared = ((e[:, None, :] - e[None, :, :]) ** 2).sum(dim=-1)  # 0 on the diagonal
        return self.sqrt(squared)


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = _batches(step)
    return x, torch.cdist(x, x) / 2  # target: half the input distances


_batches = regression_batches(POINTS, 8, lambda x, w: x @ w)


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = DistanceEmbedding(fixed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, target = batches(step)
            loss = F.mse_loss(model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
