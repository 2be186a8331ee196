"""Two models, each with its own optimizer (as a GAN has), then a Ctrl-C."""

import torch
from torch import nn


class Generator(nn.Linear):
    pass


class Critic(nn.Linear):
    pass


generator, critic = Generator(4, 4), Critic(4, 1)
g_opt = torch.optim.SGD(generator.parameters(), lr=0.01)
c_opt = torch.optim.SGD(critic.parameters(), lr=0.01)
for _ in range(3):
    c_loss = critic(generator(torch.randn(8, 4)).detach()).mean()
    c_opt.zero_grad()
    c_loss.backward()
    c_opt.step()
    g_loss = -critic(generator(torch.randn(8, 4))).mean()
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()
raise KeyboardInterrupt
