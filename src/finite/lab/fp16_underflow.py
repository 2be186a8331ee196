"""fp16-underflow: float16 training without loss scaling.

Gradients below 2**-24 (about 6e-8) are not representable in float16 and flush to
zero, so a model whose gradients are small learns nothing. Multiplying the loss by a
large scale before backward (and dividing the gradients by it before the step) lifts
them into float16's range: ``finite.LossScaler``. The scaler unscales float32 gradients,
so the fix keeps float32 master weights (``finite.MasterWeights``) for the optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import LossScaler, MasterWeights
from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "fp16-underflow"
FAULT = "float16 training without loss scaling: small gradients flush to zero"
FIX = "finite.LossScaler (scale the loss, unscale before the step) on float32 MasterWeights"
EXPECTED = "fp16_gradient_underflow"

STEPS = 40


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    with torch.no_grad():
        model[4].weight.mul_(1e-3)  # small outputs, so small gradients everywhere
    return model.half()


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _batches(step)


_batches = regression_batches(256, 16, lambda x, w: 1e-3 * torch.sin(x @ w))


def train(fixed: bool) -> Monitor:
    model = build_model()
    if fixed:
        master = MasterWeights(model.parameters())
        optimizer = torch.optim.SGD(master.parameters(), lr=1e-2)
        scaler = LossScaler(init_scale=2.0**16)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        scaler = None
    # The optimizer of the fixed run steps the float32 masters, not the model's
    # parameters, so the monitor watches the model and the scaler only.
    with monitor(model, None if fixed else optimizer, scaler=scaler) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            loss = F.mse_loss(model(x.half()).float(), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()  # float16 gradients, lifted by the scale
                master.accumulate_grads_()  # into float32, where unscaling loses nothing
                scaler.step(optimizer)  # unscales, skips the step if a gradient overflowed
                scaler.update()
                master.copy_to_model_()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
