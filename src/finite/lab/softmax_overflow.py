"""softmax-overflow: softmax written as exp(x) / sum(exp(x)) on large logits.

exp overflows float32 above x = 88.7, and inf / inf is NaN: one large logit turns the
whole row of probabilities into NaN. Subtracting the row maximum first (what
``finite.ops.softmax`` does) keeps every exp(x - max) in (0, 1], so the sum cannot
overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import ops
from finite.lab._training import classification_batches, monitor
from finite.monitor import Monitor

NAME = "softmax-overflow"
FAULT = "softmax as exp(x) / sum(exp(x)) on logits above 88: inf / inf = NaN"
FIX = "finite.ops.softmax (subtracts the row maximum before exp)"
EXPECTED = "nonfinite_loss"

STEPS = 20
CLASSES = 8


def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x)  # the fault: exp(89.0) is inf in float32
    return e / e.sum(dim=-1, keepdim=True)


class Classifier(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(16, CLASSES)
        self.softmax = (lambda x: ops.softmax(x, dim=-1)) if fixed else naive_softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.proj(x))


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = Classifier(fixed)
    with torch.no_grad():
        model.proj.weight.mul_(100.0)  # logits in the hundreds, as from an unnormalised layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = classification_batches(32, 16, CLASSES)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            probs = model(x)
            # Squared error on probabilities (Brier score): no log, so the only way to a
            # NaN loss is the softmax itself.
            loss = F.mse_loss(probs, F.one_hot(y, CLASSES).float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
