"""lr-too-high: plain SGD with a learning rate ten times too high.

Gradient descent on a quadratic is stable only while lr < 2 / lambda_max, the largest
curvature of the loss; above it each step overshoots the minimum along that direction
by more than it corrects, so the loss oscillates and then grows. A learning rate
below the limit, reached by a short linear warmup, keeps every step a descent step.

References
----------
Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017
(linear warmup).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "lr-too-high"
FAULT = "SGD at lr=0.1, ten times too high: the loss oscillates, then diverges"
FIX = "lr=0.03 reached by a 10-step linear warmup"
EXPECTED = "loss_oscillation"

STEPS = 100
WARMUP_STEPS = 10


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03 if fixed else 0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) if fixed else 1.0
    )
    # One fixed batch: the loss surface, and so its curvature, is the same every step.
    fixed_batch = regression_batches(64, 8, lambda x, w: torch.sin(x @ w) + 3 * x[:, :1])(0)
    with monitor(model, optimizer, every=5) as mon:
        for _ in range(STEPS):
            x, y = fixed_batch
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            warmup.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
