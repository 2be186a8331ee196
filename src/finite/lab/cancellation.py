"""cancellation: a sequence likelihood as a product of p and 1 - p, with p = sigmoid(z).

Two float32 faults meet in one loss. First, cancellation: sigmoid(z) rounds to exactly 1
once z > 16.6 (1 - 2**-24 is the largest float32 below 1), so 1 - p is 0 and its log is
-inf: one confidently wrong "no" makes the likelihood 0. Second, underflow: a product of
many probabilities is smaller than each of them, and below 2**-149 (about 1.4e-45, a
log-likelihood of -103) float32 has nothing but 0, so a long enough sequence of finite,
non-zero factors has likelihood 0 too; -log(0) = inf either way. In log space nothing
cancels and nothing underflows: log p = log_sigmoid(z), log(1 - p) = log_sigmoid(-z)
(or log1mexp(log p) when only log p is at hand), and the sequence's log-likelihood is
their sum.
"""

from __future__ import annotations

import torch
from torch import nn

from finite import ops
from finite.lab._training import classification_batches, monitor
from finite.monitor import Monitor

NAME = "cancellation"
FAULT = (
    "likelihood as a product of p and 1 - p: 1 - sigmoid(z) = 0 past z = 17, the product underflows"
)
FIX = "log space: finite.ops.log_sigmoid(z) and log_sigmoid(-z), summed over the sequence"
EXPECTED = "nonfinite_loss"

STEPS = 40
SEQUENCES = 16
SEQUENCE_LENGTH = 32


def naive_nll(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log of each sequence's likelihood, from probabilities (the fault)."""
    p = torch.sigmoid(z)
    # 1 - p cancels to 0 for z > 16.6, and the product of 32 factors underflows.
    likelihood = torch.where(y.bool(), p, 1 - p).prod(dim=1)
    return -torch.log(likelihood)


def stable_nll(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log of each sequence's likelihood, summed in log space (the fix)."""
    log_likelihoods = torch.where(y.bool(), ops.log_sigmoid(z), ops.log_sigmoid(-z))
    return -log_likelihoods.sum(dim=1)


_batches = classification_batches(SEQUENCES * SEQUENCE_LENGTH, 16, 2)


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): SEQUENCES sequences of SEQUENCE_LENGTH feature vectors, one 0/1 label each."""
    x, y = _batches(step)
    return x.view(SEQUENCES, SEQUENCE_LENGTH, 16), y.view(SEQUENCES, SEQUENCE_LENGTH).float()


def build_model() -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(16, 1)
    with torch.no_grad():
        model.weight.mul_(50.0)  # an overconfident classifier: logits in the tens
    return model


def train(fixed: bool) -> Monitor:
    model = build_model()
    nll = stable_nll if fixed else naive_nll
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
    with monitor(model, optimizer) as mon:
        for step in range(STEPS):
            x, y = batches(step)
            # The negative log-likelihood per label, so the scale does not depend on length.
            loss = nll(model(x).squeeze(-1), y).mean() / SEQUENCE_LENGTH
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mon.step(loss.detach())
    return mon
