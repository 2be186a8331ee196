"""What the audit compares, op by op: finite's function, PyTorch's nearest equivalent,
the naive textbook formula, the inputs and the reference.

Every implementation is called the same way, ``fn(*batch.args) -> Tensor``, with the
reductions taken over the last dimension and losses unreduced (``reduction="none"``),
so that every output element is compared with its own reference. ``mean_var``'s two
outputs are concatenated, ``(means, variances)``.

The naive formulas are what a textbook (or a first attempt) writes, evaluated in the
input dtype with no upcast and no rearrangement: ``log(sum(exp(x)))``,
``exp(x) / sum(exp(x))``, ``log(1 - exp(x))``, ``E[x^2] - E[x]^2``, a left-to-right
running sum... ``torch`` is ``None`` where PyTorch has no such function, ``naive`` where
the textbook formula *is* PyTorch's (the safe elementary functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from finite import ops
from finite.audit import domains, references
from finite.audit.domains import SOFTCAP, SOFTPLUS_BETA, Batch

__all__ = ["CASES", "AuditCase"]

# One call of an implementation: fn(*args) -> Tensor (Any: some ops' declared return
# types are unions, e.g. logsumexp with return_sign).
Implementation = Callable[..., Any]
InputGenerator = Callable[[torch.dtype, int, torch.Generator], list[Batch]]


@dataclass(frozen=True)
class AuditCase:
    """One op under audit.

    Attributes
    ----------
    name : str
        The op's name in :mod:`finite.ops`.
    finite, torch, naive : callable or None
        The three implementations compared, each ``fn(*args) -> Tensor``.
    inputs : callable
        ``inputs(dtype, samples, generator) -> list[Batch]`` (see
        :mod:`finite.audit.domains`).
    reference : callable
        ``reference(args, cotangent, fmt) -> (values, gradients)`` (see
        :mod:`finite.audit.references`).
    differentiable : tuple of int
        Positions of the arguments whose gradients are audited.
    """

    name: str
    finite: Implementation
    torch: Implementation | None
    naive: Implementation | None
    inputs: InputGenerator
    reference: references.Reference
    differentiable: tuple[int, ...] = (0,)


# --------------------------------------------------------------------------------------
# Naive formulas, in the input dtype
# --------------------------------------------------------------------------------------


def _naive_softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def _naive_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def _naive_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -torch.log(_naive_softmax(logits)).gather(-1, target[:, None]).squeeze(-1)


def _naive_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = _naive_sigmoid(logits)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p))


def _running_sum(x: torch.Tensor) -> torch.Tensor:
    """Left to right, each partial sum rounded to the input dtype."""
    total = x[..., 0]
    for j in range(1, x.shape[-1]):
        total = total + x[..., j]
    return total


def _naive_mean_var(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1)
    return torch.cat([mean, (x * x).mean(-1) - mean * mean])


# --------------------------------------------------------------------------------------
# PyTorch's nearest equivalents, where the call needs adapting
# --------------------------------------------------------------------------------------


def _torch_logmeanexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, -1) - math.log(x.shape[-1])


def _torch_mean_var(x: torch.Tensor) -> torch.Tensor:
    var, mean = torch.var_mean(x, -1, correction=0)
    return torch.cat([mean, var])


def _finite_mean_var(x: torch.Tensor) -> torch.Tensor:
    return torch.cat(ops.mean_var(x, -1))


_ALL = (
    AuditCase(
        "logsumexp",
        finite=lambda x: ops.logsumexp(x, -1),
        torch=lambda x: torch.logsumexp(x, -1),
        naive=lambda x: torch.log(torch.exp(x).sum(-1)),
        inputs=domains.reduction_rows,
        reference=references.logsumexp,
    ),
    AuditCase(
        "logmeanexp",
        finite=lambda x: ops.logmeanexp(x, -1),
        torch=_torch_logmeanexp,
        naive=lambda x: torch.log(torch.exp(x).mean(-1)),
        inputs=domains.reduction_rows,
        reference=references.logmeanexp,
    ),
    AuditCase(
        "logaddexp",
        finite=ops.logaddexp,
        torch=torch.logaddexp,
        naive=lambda a, b: torch.log(torch.exp(a) + torch.exp(b)),
        inputs=domains.logaddexp_inputs,
        reference=references.logaddexp,
        differentiable=(0, 1),
    ),
    AuditCase(
        "logsubexp",
        finite=ops.logsubexp,
        torch=None,
        naive=lambda a, b: torch.log(torch.exp(a) - torch.exp(b)),
        inputs=domains.logsubexp_inputs,
        reference=references.logsubexp,
        differentiable=(0, 1),
    ),
    AuditCase(
        "log1mexp",
        finite=ops.log1mexp,
        torch=None,
        naive=lambda x: torch.log(1 - torch.exp(x)),
        inputs=domains.log1mexp_inputs,
        reference=references.log1mexp,
    ),
    AuditCase(
        "log1pexp",
        finite=ops.log1pexp,
        torch=F.softplus,
        naive=lambda x: torch.log(1 + torch.exp(x)),
        inputs=domains.real_line,
        reference=references.log1pexp,
    ),
    AuditCase(
        "sigmoid",
        finite=ops.sigmoid,
        torch=torch.sigmoid,
        naive=_naive_sigmoid,
        inputs=domains.real_line,
        reference=references.sigmoid,
    ),
    AuditCase(
        "log_sigmoid",
        finite=ops.log_sigmoid,
        torch=F.logsigmoid,
        naive=lambda x: torch.log(_naive_sigmoid(x)),
        inputs=domains.real_line,
        reference=references.log_sigmoid,
    ),
    AuditCase(
        "softplus",
        finite=lambda x: ops.softplus(x, beta=SOFTPLUS_BETA),
        torch=lambda x: F.softplus(x, beta=SOFTPLUS_BETA),
        naive=lambda x: torch.log(1 + torch.exp(SOFTPLUS_BETA * x)) / SOFTPLUS_BETA,
        inputs=domains.softplus_inputs,
        reference=references.softplus,
    ),
    AuditCase(
        "softcap",
        finite=lambda x: ops.softcap(x, SOFTCAP),
        torch=None,
        naive=lambda x: SOFTCAP * torch.tanh(x / SOFTCAP),
        inputs=domains.softcap_inputs,
        reference=references.softcap,
    ),
    AuditCase(
        "softmax",
        finite=lambda x: ops.softmax(x, -1),
        torch=lambda x: torch.softmax(x, -1),
        naive=_naive_softmax,
        inputs=domains.softmax_rows,
        reference=references.softmax,
    ),
    AuditCase(
        "log_softmax",
        finite=lambda x: ops.log_softmax(x, -1),
        torch=lambda x: torch.log_softmax(x, -1),
        naive=lambda x: torch.log(_naive_softmax(x)),
        inputs=domains.softmax_rows,
        reference=references.log_softmax,
    ),
    AuditCase(
        "cross_entropy",
        finite=lambda x, t: ops.cross_entropy(x, t, reduction="none"),
        torch=lambda x, t: F.cross_entropy(x, t, reduction="none"),
        naive=_naive_cross_entropy,
        inputs=domains.cross_entropy_rows,
        reference=references.cross_entropy,
    ),
    AuditCase(
        "binary_cross_entropy_with_logits",
        finite=lambda x, y: ops.binary_cross_entropy_with_logits(x, y, reduction="none"),
        torch=lambda x, y: F.binary_cross_entropy_with_logits(x, y, reduction="none"),
        naive=_naive_bce,
        inputs=domains.binary_targets,
        reference=references.binary_cross_entropy_with_logits,
    ),
    AuditCase(
        "compensated_sum",
        finite=lambda x: ops.compensated_sum(x, -1),
        torch=lambda x: torch.sum(x, -1),
        naive=_running_sum,
        inputs=domains.sum_rows,
        reference=references.compensated_sum,
    ),
    AuditCase(
        "mean_var",
        finite=_finite_mean_var,
        torch=_torch_mean_var,
        naive=_naive_mean_var,
        inputs=domains.statistics_rows,
        reference=references.mean_var,
    ),
    AuditCase(
        "l2_norm",
        finite=lambda x: ops.l2_norm(x, -1),
        torch=lambda x: torch.linalg.vector_norm(x, dim=-1),
        naive=lambda x: torch.sqrt((x * x).sum(-1)),
        inputs=domains.norm_rows,
        reference=references.l2_norm,
    ),
    AuditCase(
        "safe_sqrt",
        finite=ops.safe_sqrt,
        torch=torch.sqrt,
        naive=None,
        inputs=domains.positive_inputs,
        reference=references.safe_sqrt,
    ),
    AuditCase(
        "safe_log",
        finite=ops.safe_log,
        torch=torch.log,
        naive=None,
        inputs=domains.normal_positive_inputs,
        reference=references.safe_log,
    ),
    AuditCase(
        "safe_div",
        finite=ops.safe_div,
        torch=torch.div,
        naive=None,
        inputs=domains.division_inputs,
        reference=references.safe_div,
        differentiable=(0, 1),
    ),
)

CASES: Mapping[str, AuditCase] = MappingProxyType({case.name: case for case in _ALL})
"""Every audited op by name, in the order of the table."""
