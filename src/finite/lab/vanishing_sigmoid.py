"""vanishing-sigmoid: a ten-layer sigmoid MLP whose first layers get no gradient.

The derivative of the sigmoid is at most 1/4, so the gradient reaching the first layer
of a ten-layer sigmoid network is scaled by less than 4**-10 (about 1e-6) relative to
the last: the early layers do not learn and the loss plateaus. ReLU-family activations
(derivative 1 where active) with He initialisation keep the gradient's scale from layer
to layer.

References
----------
Glorot and Bengio, "Understanding the difficulty of training deep feedforward neural
networks", AISTATS 2010. He et al., "Delving Deep into Rectifiers", ICCV 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "vanishing-sigmoid"
FAULT = "ten sigmoid layers: the first layer's gradient is below 4**-10 of the last's"
FIX = "GELU activations with He (Kaiming) initialisation"
EXPECTED = "vanishing_gradients"

STEPS = 40
DEPTH = 10


def build_model(fixed: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 16
    for _ in range(DEPTH):
        linear = nn.Linear(width, 32)
        if fixed:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.GELU() if fixed else nn.Sigmoid()]
        width = 32
    return nn.Sequential(*layers, nn.Linear(32, 1))


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = build_model(fixed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 if not fixed else 0.01)
    batches = regression_batches(64, 16, lambda x, w: torch.sin(x @ w))
    with monitor(model, optimizer, every=5) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
