"""bf16-swamping: pure bfloat16 weights updated with a small learning rate.

bfloat16 keeps 8 significant bits: an update smaller than half a unit in the last place
of its weight (|w| * 2**-9) is rounded away, so with AdamW at lr=3e-5 most updates
are lost and the loss stalls: over 300 steps it falls from 0.75 to 0.72 where float32
weights reach 0.62. Kahan-compensated updates keep the rounding error of each step in a
buffer and add it back at the next, so small updates accumulate, and the bfloat16 run
follows the float32 one.

References
----------
Zamirai et al., "Revisiting BFloat16 Training", 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import StableStep, compensated
from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "bf16-swamping"
FAULT = "pure bfloat16 weights, AdamW lr=3e-5: updates below half an ulp are rounded away"
FIX = 'finite.compensated(optimizer, "kahan") in finite.StableStep: Kahan-summed updates'
EXPECTED = "bf16_update_swamping"

STEPS = 300
LR = 3e-5


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(torch.bfloat16)
    plain = torch.optim.AdamW(model.parameters(), lr=LR)
    optimizer = compensated(plain, "kahan") if fixed else plain
    batches = regression_batches(64, 16, lambda x, w: torch.sin(x @ w))
    with monitor(model, optimizer, every=5) as mon:
        step = StableStep(model, optimizer, monitor=mon) if fixed else None
        for i in range(STEPS):
            x, y = batches(i)
            loss = F.mse_loss(model(x.bfloat16()).float(), y)
            if step is not None:
                step(loss)  # backward, inf/NaN check, compensated step, zero, record
                continue
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
