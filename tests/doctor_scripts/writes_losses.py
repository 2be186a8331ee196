"""Trains 4 steps with a finite.LossScaler and writes its own losses, one a line."""

import sys
from pathlib import Path

import torch
from torch import nn

import finite

torch.manual_seed(0)
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
scaler = finite.LossScaler(init_scale=1024.0)
losses = []
for _ in range(4):
    loss = model(torch.randn(8, 4)).square().mean()
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    losses.append(repr(loss.item()))
Path(sys.argv[1]).write_text("\n".join(losses))
