"""A healthy float32 regression: the doctor should find nothing above "info"."""

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
criterion = nn.MSELoss()
w = torch.randn(8, 1)
for _ in range(12):
    x = torch.randn(32, 8)
    loss = criterion(model(x), x @ w)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print("trained", len(__import__("sys").argv))
