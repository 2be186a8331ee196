"""exploding-rnn: a vanilla ReLU RNN on long sequences, trained without clipping.

Backpropagation through time multiplies the gradient by the recurrent Jacobian once per
time step; with recurrent weights just above the identity the gradient over 40 steps
grows like 1.05**40, the first updates make the weights larger still, and within a few
steps the gradient and then the weights overflow to inf/NaN. Clipping the global
gradient norm bounds every update, so the weights never reach the unstable region.

References
----------
Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
networks", ICML 2013.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import clip_grad_norm_
from finite.lab._training import monitor, seeded
from finite.monitor import Monitor

NAME = "exploding-rnn"
FAULT = "vanilla RNN over 40 steps, recurrent weights 1.05 * I, no clipping: gradients explode"
FIX = "finite.clip_grad_norm_(model.parameters(), max_norm=1.0) before the step"
EXPECTED = "exploding_gradients"

STEPS = 40
SEQUENCE_LENGTH = 40


class RNNRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The target depends on the first 5 inputs only: the gradient must travel 35+ steps.
    x = torch.randn(16, SEQUENCE_LENGTH, 4, generator=seeded(step))
    return x, x[:, :5, 0].sum(1, keepdim=True)


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = RNNRegressor()
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.05 * torch.eye(32))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if fixed:
                clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
