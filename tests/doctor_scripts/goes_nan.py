"""A model whose second layer takes the log of a negative number: NaN, then an error."""

import math

import torch
from torch import nn


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), Log(), nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    loss = model(torch.randn(16, 4)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"loss is {loss.item()} at step {step}")
