"""Gradient accumulation: 3 micro-batches a step, each loss divided by 3 before backward.
Writes, one a line, the sum of the 3 divided losses of each step (the mean micro-batch
loss) to the file named by its first argument."""

import sys
from pathlib import Path

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
sums = []
for _ in range(4):
    optimizer.zero_grad()
    total = 0.0
    for _ in range(3):
        loss = model(torch.randn(8, 4)).square().mean() / 3
        loss.backward()
        total += loss.item()
    optimizer.step()
    sums.append(repr(total))
Path(sys.argv[1]).write_text("\n".join(sums))
