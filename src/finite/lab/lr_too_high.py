"""lr-too-high: plain SGD at a learning rate the loss surface cannot take for long.

Gradient descent is stable only while lr < 2 / lambda_max, lambda_max the largest
curvature of the loss; above it each step overshoots the minimum along that direction by
more than it corrects. At lr = 0.1 the start is stable (lambda_max = 5, limit 20), but
training sharpens the surface: by steps 10 to 15 lambda_max is 30 to 70, the steps
overshoot, and the loss jumps from 0.68 back up to 14.6, twice its starting value; it
jumps again near step 45 and ends zigzagging from step to step. A lower learning rate
(limit 67), reached by a short linear warmup, keeps the loss falling step after step on
this full batch.

References
----------
Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017
(linear warmup). Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at
the Edge of Stability", ICLR 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import StableStep
from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "lr-too-high"
FAULT = "SGD at lr=0.1: training sharpens the loss past 2/lr; it jumps back up and zigzags"
FIX = "lr=0.03 reached by a 10-step linear warmup: finite.StableStep(..., scheduler=warmup)"
EXPECTED = "loss_oscillation"

STEPS = 100
WARMUP_STEPS = 10


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )


def train(fixed: bool) -> Monitor:
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03 if fixed else 0.1)
    # One fixed batch: the loss surface, and so its curvature, is the same every step.
    x, y = regression_batches(64, 8, lambda x, w: torch.sin(x @ w) + 3 * x[:, :1])(0)
    with monitor(model, optimizer, every=5) as mon:
        step = None
        if fixed:
            warmup = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda i: min(1.0, (i + 1) / WARMUP_STEPS)
            )
            # StableStep advances the schedule only on steps the optimizer took.
            step = StableStep(model, optimizer, scheduler=warmup, monitor=mon)
        for _ in range(STEPS):
            loss = F.mse_loss(model(x), y)
            if step is not None:
                step(loss)
                continue
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
