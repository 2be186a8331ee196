"""zero-variance-norm: a standardisation (x - mean) / sqrt(var) without epsilon.

A feature that is constant over the batch (a column of ones, a sensor that is stuck) has
var = 0 and x - mean = 0, so the layer computes 0 / 0 = NaN and the loss is NaN from the
first step. An epsilon under the square root, sqrt(var + eps), bounds the divisor away
from zero: the constant feature becomes 0 and the rest is unchanged to within eps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "zero-variance-norm"
FAULT = "feature standardisation without epsilon on a constant feature: 0 / 0 = NaN"
FIX = "an epsilon in the norm: (x - mean) / sqrt(var + 1e-5)"
EXPECTED = "nonfinite_loss"

STEPS = 20
EPS = 1e-5


class Standardise(nn.Module):
    """Per-feature standardisation over the batch, as a batch norm without running stats."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=0, keepdim=True)
        var = x.var(dim=0, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)  # eps = 0 is the fault


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batches(step)
    x[:, 0] = 1.0  # a bias column of ones: exactly constant, its variance is exactly 0
    return x, y


_batches = regression_batches(32, 16, lambda x, w: torch.tanh(x[:, 1:] @ w[1:]))


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(
        Standardise(EPS if fixed else 0.0), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
