"""Three healthy steps, then a loss that is NaN: backward() runs, and the script raises
before optimizer.step(), as a training loop that checks its loss does. Writes its losses,
one a line, to the file named by its first argument."""

import math
import sys
from pathlib import Path

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
written = Path(sys.argv[1])
losses = []
for step in range(4):
    out = model(torch.randn(8, 4))
    # The loss takes a log; at step 3 its argument goes negative: the model's output is
    # finite, the loss is NaN.
    shift = -100.0 if step == 3 else 100.0
    loss = torch.log(out.square().mean() + shift)
    optimizer.zero_grad()
    loss.backward()
    losses.append(repr(loss.item()))
    written.write_text("\n".join(losses))
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}")
    optimizer.step()
