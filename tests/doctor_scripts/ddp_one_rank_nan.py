"""Data-parallel training on two gloo ranks where only rank 1's data goes bad.

Run with ``torchrun --nproc-per-node 2``. The model takes the square root of its input's
first features; at step 2 rank 1's batch holds negative values there, so rank 1's
forward pass makes NaN in ``Sqrt`` while rank 0's batch is fine. The gradient all-reduce
then carries the NaN to rank 0, whose weights turn NaN with rank 1's.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DistributedDataParallel(nn.Sequential(Sqrt(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
generator = torch.Generator().manual_seed(rank)
for step in range(4):
    x = torch.rand(16, 4, generator=generator)
    if rank == 1 and step == 2:
        x[3, 0] = -1.0  # a corrupt sample in rank 1's shard
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
dist.destroy_process_group()
