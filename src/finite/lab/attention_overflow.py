"""attention-overflow: float16 attention scores q @ k^T without the 1/sqrt(d) scale.

A score is a sum of d products; with activations around a hundred and d = 64 it passes
float16's largest value, 65504, and becomes inf. Softmax of a row holding inf is
inf / inf = NaN. Scaling the scores by 1/sqrt(d), with the softmax and its sum in
float32, is what ``finite.memory.attention`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from finite import memory
from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "attention-overflow"
FAULT = "float16 attention scores q @ k^T without 1/sqrt(d) on large activations: inf, then NaN"
FIX = "finite.memory.attention (scores scaled by 1/sqrt(d), softmax accumulated in float32)"
EXPECTED = "nonfinite_loss"

STEPS = 20
TOKENS = 8
DIM = 64


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1)  # the fault: no 1/sqrt(d), and a float16 sum of d terms
    return torch.softmax(scores, dim=-1) @ v


class SelfAttention(nn.Module):
    """One attention head whose score and value products run in float16, as under autocast."""

    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.head = nn.Linear(DIM, 1)
        self.attend = memory.attention if fixed else naive_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).half().chunk(3, dim=-1)
        return self.head(self.attend(q, k, v).float()).mean(dim=1)


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batches(step)
    # Activations around a hundred, as from a residual stream that was never normalised.
    return 100.0 * x.view(-1, TOKENS, DIM), y.view(-1, TOKENS).mean(dim=1, keepdim=True)


_batches = regression_batches(16 * TOKENS, DIM, lambda x, w: torch.tanh(x @ w / math.sqrt(DIM)))


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = SelfAttention(fixed)
    with torch.no_grad():
        model.head.weight.mul_(1e-2)  # values are as large as the inputs; keep the output O(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
