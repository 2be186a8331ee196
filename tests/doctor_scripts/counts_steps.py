"""Trains 50 steps and writes how many finished to the file named by its first argument."""

import sys
from pathlib import Path

import torch
from torch import nn

model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
done = Path(sys.argv[1])
for step in range(50):
    loss = model(torch.randn(8, 4)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    done.write_text(str(step + 1))
