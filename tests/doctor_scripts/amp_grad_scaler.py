"""Mixed precision on the CPU: float16 autocast, torch.amp.GradScaler, clip_grad_norm_.

The scaler starts at 2**20: the float16 gradients of the first steps overflow, so the
scaler skips those steps and halves its scale until they fit. After each step the
script appends to the file named by its first argument what it saw itself: the scale
used, whether the scaler skipped the step, the norm clip_grad_norm_ returned (before
clipping) and the loss.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
w = torch.randn(16, 1) / 4
written = Path(sys.argv[1])
seen = []
for _ in range(16):
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), x @ w)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    scale = scaler.get_scale()
    seen.append({"scale": scale, "norm": norm.item(), "loss": loss.item()})
    scaler.step(optimizer)
    scaler.update()
    seen[-1]["skipped"] = scaler.get_scale() < scale
    written.write_text("\n".join(json.dumps(s) for s in seen))
