"""lr-too-high: plain SGD at a learning rate the loss surface cannot take for long.

Gradient descent is stable only while lr < 2 / lambda_max, lambda_max the largest
curvature of the loss: above it each step overshoots the minimum along that direction by
more than it corrects. A tanh MLP trained at lr = 0.3 on one fixed batch first makes
progress (the loss falls from 6.8 to 1.0 in three steps), then training sharpens the
surface past 2 / lr: the loss swings between 1 and 7 for a few steps, grows geometrically
from step 11 (60, 2900, 52000, ...), overflows float32 at step 36 and is NaN after. The
same network at lr = 0.05 (inside the 0.1-0.03 the doctor suggests), reached by a 10-step
linear warmup, keeps its loss falling. Warmup alone is no cure: the surface keeps
sharpening while the learning rate is small, and lr = 0.1 reached over 20 steps
oscillates.

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
FAULT = "SGD at lr=0.3: progress, then the loss swings, grows geometrically and overflows"
FIX = "lr=0.05 reached by a 10-step linear warmup: finite.StableStep(..., scheduler=warmup)"
EXPECTED = "divergence_after_progress"

STEPS = 60
BROKEN_LR, FIXED_LR = 0.3, 0.05
WARMUP_STEPS = 10


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch: the loss surface, and so its curvature, is the same every step."""
    return regression_batches(64, 8, lambda x, w: torch.sin(x @ w) + 3 * x[:, :1])(0)


def train(fixed: bool) -> Monitor:
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=FIXED_LR if fixed else BROKEN_LR)
    x, y = batch()
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
