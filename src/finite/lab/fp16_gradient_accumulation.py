"""fp16-gradient-accumulation: 32 micro-batch gradients summed in a float16 ``.grad``.

``loss.backward()`` adds each micro-batch's gradient into ``.grad``, which has the
parameter's dtype. Here the loss of each micro-batch is a sum over its 64 examples and
the accumulated gradient is divided by the window's 2048 examples before the step (the
way a loss summed over tokens is normalised by the window's token count). Each
micro-batch's gradient fits in float16, below 65504; their running sum passes it within
the first window, turns into inf, and the step writes inf/NaN into the weights. Adding
every micro-batch's gradient into float32 master gradients (``finite.MasterWeights``,
``accumulate_grads_()`` after each backward pass) holds the sum, and the division by the
example count happens in float32 too.

Why the range and not the precision of the sum: rounding N terms into a float16 running
sum changes it by at most (N - 1) * 2**-11 of the sum of their magnitudes (1.5% for 32
same-sign terms, typically far less as roundings of both signs cancel), and it takes
about 2**11 equal terms before the running sum swallows the next one whole. 32 summed
losses run out of range long before they run out of bits.

References
----------
Micikevicius et al., "Mixed Precision Training", ICLR 2018.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import MasterWeights
from finite.lab._training import monitor, regression_batches
from finite.monitor import Monitor

NAME = "fp16-gradient-accumulation"
FAULT = (
    "summed losses of 32 micro-batches in the float16 .grad: the sum passes 65504, each one fits"
)
FIX = "finite.MasterWeights: accumulate_grads_() after every backward, the sum in float32"
EXPECTED = "fp16_accumulation_overflow"

STEPS = 30
MICRO_BATCHES = 32
EXAMPLES = 64  # per micro-batch
LEARNING_RATE = 0.01


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).half()


_batches = regression_batches(EXAMPLES, 16, lambda x, w: 4.0 * (x @ w) + 32.0)


def micro_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of window ``step``: float16 inputs, float32 targets."""
    x, y = _batches(step * MICRO_BATCHES + micro)
    return x.half(), y


def summed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the micro-batch's examples (normalised after the window)."""
    return F.mse_loss(model(x).float(), y, reduction="sum")


def train(fixed: bool) -> Monitor:
    model = build_model()
    examples = MICRO_BATCHES * EXAMPLES
    master = MasterWeights(model.parameters()) if fixed else None
    # The optimizer steps what holds the summed gradients: the float32 masters, or the
    # float16 model itself.
    params = master.parameters() if master is not None else list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=LEARNING_RATE)
    # The fixed run's optimizer does not hold the model's parameters, so its monitor
    # watches the model alone.
    with monitor(model, None if fixed else optimizer) as mon:
        for step in range(STEPS):
            window_loss = torch.zeros(())
            for micro in range(MICRO_BATCHES):
                loss = summed_loss(model, *micro_batch(step, micro))
                loss.backward()  # the float16 gradient is added into the float16 .grad
                if master is not None:
                    master.accumulate_grads_()  # ... or into float32; .grad is cleared
                window_loss += loss.detach()
            # The mean over the window's examples, formed after the sum.
            torch._foreach_div_([p.grad for p in params if p.grad is not None], examples)
            optimizer.step()
            optimizer.zero_grad()
            if master is not None:
                master.copy_to_model_()
                master.zero_grad()
            mon.step(window_loss / examples)
    return mon
