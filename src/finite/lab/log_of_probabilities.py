"""log-of-probabilities: cross-entropy as -log(softmax(x)) in float16.

A float16 probability below 2**-24 (about 6e-8) rounds to 0, and log(0) = -inf: once
the logits of a row spread over more than ln(2**24) = 16.6, the loss is infinite and
its gradient NaN. Cross-entropy from the logits computes log-softmax as
x - logsumexp(x), which never forms the small probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finite import ops
from finite.lab._training import classification_batches, monitor
from finite.monitor import Monitor

NAME = "log-of-probabilities"
FAULT = "cross-entropy as -log(softmax(x)) in float16: probabilities round to 0, log(0) = -inf"
FIX = "cross-entropy from the logits: finite.ops.cross_entropy(logits, target)"
EXPECTED = "nonfinite_loss"

STEPS = 60
CLASSES = 10


def train(fixed: bool) -> Monitor:
    torch.manual_seed(0)
    model = nn.Linear(16, CLASSES)
    with torch.no_grad():
        model.weight.mul_(20.0)  # logits spread over more than ln(2**24)
    # Cross-entropy's gradient (softmax - onehot) x is bounded by |x|: a large step is
    # safe, and it takes a few dozen of them to undo logits twenty times too large.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = classification_batches(32, 16, CLASSES)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            # float16 activations on float32 weights, as under autocast
            logits = model(x).half()
            if fixed:
                loss = ops.cross_entropy(logits, y)
            else:
                log_probs = torch.log(torch.softmax(logits, dim=-1))  # the fault
                loss = F.nll_loss(log_probs.float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
