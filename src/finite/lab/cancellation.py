"""cancellation: log(1 - p) with p = sigmoid(z) near 1.

float32 rounds sigmoid(z) to exactly 1 once z > 16.6 (1 - 2**-24 is the largest float32
below 1), so 1 - p cancels to 0 and log(0) = -inf: a confidently wrong prediction makes
the binary cross-entropy infinite, and for a label of 1 the masked term (1 - y) * log(1 - p)
is 0 * -inf = NaN. In log space nothing cancels: log p = log_sigmoid(z)
is a tiny negative number kept to full precision, and log(1 - p) = log1mexp(log p).
"""

from __future__ import annotations

import torch
from torch import nn

from finite import ops
from finite.lab._training import classification_batches, monitor
from finite.monitor import Monitor

NAME = "cancellation"
FAULT = "binary cross-entropy as log(1 - sigmoid(z)) with z > 17: 1 - p = 0, log(0) = -inf"
FIX = "log space: log p = finite.ops.log_sigmoid(z), log(1 - p) = finite.ops.log1mexp(log p)"
EXPECTED = "nonfinite_loss"

STEPS = 40


def naive_log_likelihoods(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.sigmoid(z)
    return torch.log(p), torch.log(1 - p)  # the fault: 1 - p cancels to 0 for z > 16.6


def stable_log_likelihoods(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = ops.log_sigmoid(z)
    return log_p, ops.log1mexp(log_p)


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batches(step)
    return x, y.float()


_batches = classification_batches(64, 16, 2)


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = nn.Linear(16, 1)
    with torch.no_grad():
        model.weight.mul_(50.0)  # an overconfident classifier: logits in the tens
    log_likelihoods = stable_log_likelihoods if fixed else naive_log_likelihoods
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            log_p, log_1mp = log_likelihoods(model(x).squeeze(1))
            loss = -(y * log_p + (1 - y) * log_1mp).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
