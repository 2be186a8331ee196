"""exploding-rnn: an identity-initialised ReLU RNN on long sequences, trained without clipping.

Backpropagation through time multiplies the gradient by the recurrent Jacobian once per
time step. With the recurrent weights at the identity (an IRNN) the first gradient is
already in the hundreds, and one plain SGD step of that size stretches the recurrent
matrix: its largest singular value goes from 1 to 1.5. Forty rectified steps through it
grow the hidden state by thousands and the next gradient by eight orders of magnitude;
a few steps later the gradient, then the weights and the loss, overflow to inf/NaN.
Clipping the global gradient norm to 1 bounds every update (the matrix moves by at most
lr * 1 = 0.005), so the weights never reach the unstable region and the same learning
rate trains the network.

References
----------
Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
networks", ICML 2013. Le, Jaitly and Hinton, "A Simple Way to Initialize Recurrent
Networks of Rectified Linear Units", 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import StableStep
from finite.lab._training import monitor, seeded
from finite.monitor import Monitor

NAME = "exploding-rnn"
FAULT = "ReLU RNN over 40 steps, recurrent weights = I, SGD without clipping: gradients explode"
FIX = "finite.StableStep(model, optimizer, clip=1.0): the global gradient norm clipped to 1"
EXPECTED = "exploding_gradients"

STEPS = 60
SEQUENCE_LENGTH = 40
LEARNING_RATE = 5e-3
MAX_NORM = 1.0


class RNNRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def build_model() -> RNNRegressor:
    torch.manual_seed(0)
    model = RNNRegressor()
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(torch.eye(32))
    return model


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The target is three times the mean of the first channel over the whole sequence:
    # every time step matters, so the gradient travels all 40 steps back.
    x = torch.randn(16, SEQUENCE_LENGTH, 4, generator=seeded(step))
    return x, 3.0 * x[:, :, 0].mean(1, keepdim=True)


def train(fixed: bool) -> Monitor:
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    with monitor(model, optimizer) as mon:
        step = StableStep(model, optimizer, clip=MAX_NORM, monitor=mon) if fixed else None
        for i in range(STEPS):
            x, y = batches(i)
            loss = F.mse_loss(model(x), y)
            if step is not None:
                step(loss)  # backward, clip to MAX_NORM, step, zero, record
                continue
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
