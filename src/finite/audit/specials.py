"""The specified behaviour at the edges: infinities, empty masks, ignored targets, zero.

Where the accuracy audit measures ULPs on finite inputs, these cases check exact
outcomes the specification (the issue and each op's docstring) promises: e.g.
``logsumexp`` of an all ``-inf`` slice is ``-inf`` *with a zero gradient*, a fully
masked softmax row is zeros, ``safe_sqrt(0)`` has gradient 0. The expected values come
from the mathematics or the specification, never from running the code. PyTorch's
nearest equivalent is held to the same expectation, to show where it differs.

A value matches when both are NaN, or both are the same infinity, or the result is
within 1 ULP of the expected finite value (``-0.0`` equals ``0.0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from finite import ops
from finite.audit.domains import SOFTCAP, SOFTPLUS_BETA
from finite.audit.ulp import ulp_error
from finite.formats import FloatFormat, get_format

__all__ = ["SPECIAL_CASES", "SpecialCase", "SpecialResult", "check_special"]

_INF = math.inf
_NAN = math.nan

Expected = Sequence[float] | Callable[[FloatFormat], Sequence[float]]
Implementation = Callable[..., Any]
Arguments = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class SpecialCase:
    """One specified edge case.

    Attributes
    ----------
    op : str
        The op (a key of :data:`finite.audit.CASES`).
    description : str
        The edge, in words: ``"all -inf slice"``.
    finite, torch : callable or None
        finite's call and PyTorch's nearest equivalent, ``fn(*args) -> Tensor``.
    args : tuple of Tensor
        Arguments; floating-point ones are cast to the dtype under test.
    value : sequence of float, or callable
        Expected output elements (a function of the format where they depend on it).
    gradient : sequence of float, callable or None
        Expected gradient (with respect to the arguments in ``differentiable``,
        flattened and concatenated) for a cotangent of ones; ``None``: not specified.
    differentiable : tuple of int
        Positions of the arguments whose gradients are checked.
    """

    op: str
    description: str
    finite: Implementation
    torch: Implementation | None
    args: Arguments
    value: Expected
    gradient: Expected | None = None
    differentiable: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class SpecialResult:
    """Whether finite and PyTorch behave as specified on one edge case in one dtype.

    ``torch`` is ``None`` where PyTorch has no equivalent. ``finite_output`` and
    ``torch_output`` list what came out (values, then gradient) for the record.
    """

    op: str
    description: str
    dtype: str
    finite: bool
    torch: bool | None
    finite_output: tuple[float, ...]
    torch_output: tuple[float, ...] | None


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _rows(*rows: Sequence[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _masked_torch_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.masked_fill(~mask, -_INF), -1)


def _masked_torch_log_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.masked_fill(~mask, -_INF), -1)


def _safe_log_floor(fmt: FloatFormat) -> list[float]:
    return [math.log(fmt.min_normal)]


def _safe_div_clamp(fmt: FloatFormat) -> list[float]:
    """``safe_div(1, 0)``: 1 over the default clamp ``sqrt(smallest normal)``."""
    return [1 / math.sqrt(fmt.min_normal)]


def _safe_div_gradient(fmt: FloatFormat) -> list[float]:
    return [1 / math.sqrt(fmt.min_normal), 0.0]


_NO_MASK = torch.tensor([[False, False, False]])
_ALL_NEG_INF = _rows([-_INF, -_INF, -_INF])

SPECIAL_CASES: tuple[SpecialCase, ...] = (
    SpecialCase(
        "logsumexp",
        "all -inf slice: -inf, zero gradient",
        lambda x: ops.logsumexp(x, -1),
        lambda x: torch.logsumexp(x, -1),
        (_ALL_NEG_INF,),
        [-_INF],
        [0.0, 0.0, 0.0],
    ),
    SpecialCase(
        "logsumexp",
        "-inf entries next to finite ones",
        lambda x: ops.logsumexp(x, -1),
        lambda x: torch.logsumexp(x, -1),
        (_rows([0.0, -_INF, -_INF]),),
        [0.0],
        [1.0, 0.0, 0.0],
    ),
    SpecialCase(
        "logsumexp",
        "+inf entry: +inf",
        lambda x: ops.logsumexp(x, -1),
        lambda x: torch.logsumexp(x, -1),
        (_rows([1.0, _INF, -_INF]),),
        [_INF],
    ),
    SpecialCase(
        "logsumexp",
        "NaN propagates",
        lambda x: ops.logsumexp(x, -1),
        lambda x: torch.logsumexp(x, -1),
        (_rows([_NAN, 1.0, -_INF]),),
        [_NAN],
    ),
    SpecialCase(
        "logmeanexp",
        "all -inf slice: -inf, zero gradient",
        lambda x: ops.logmeanexp(x, -1),
        lambda x: torch.logsumexp(x, -1) - math.log(x.shape[-1]),
        (_ALL_NEG_INF,),
        [-_INF],
        [0.0, 0.0, 0.0],
    ),
    SpecialCase(
        "logaddexp",
        "both -inf: -inf, zero gradients",
        ops.logaddexp,
        torch.logaddexp,
        (_t(-_INF), _t(-_INF)),
        [-_INF],
        [0.0, 0.0],
        (0, 1),
    ),
    SpecialCase(
        "logaddexp",
        "+inf and finite: +inf",
        ops.logaddexp,
        torch.logaddexp,
        (_t(_INF), _t(1.0)),
        [_INF],
    ),
    SpecialCase(
        "logsubexp",
        "a == b: -inf",
        ops.logsubexp,
        None,
        (_t(1.5), _t(1.5)),
        [-_INF],
    ),
    SpecialCase(
        "logsubexp",
        "both -inf: -inf, zero gradients",
        ops.logsubexp,
        None,
        (_t(-_INF), _t(-_INF)),
        [-_INF],
        [0.0, 0.0],
        (0, 1),
    ),
    SpecialCase(
        "logsubexp",
        "a = +inf, b finite: +inf",
        ops.logsubexp,
        None,
        (_t(_INF), _t(0.0)),
        [_INF],
    ),
    SpecialCase("log1mexp", "x = 0: -inf", ops.log1mexp, None, (_t(0.0),), [-_INF]),
    SpecialCase(
        "log1mexp", "x = -inf: 0, zero gradient", ops.log1mexp, None, (_t(-_INF),), [0.0], [0.0]
    ),
    SpecialCase(
        "log1pexp",
        "±inf: 0 and +inf, gradients 0 and 1",
        ops.log1pexp,
        F.softplus,
        (_t(-_INF, _INF),),
        [0.0, _INF],
        [0.0, 1.0],
    ),
    SpecialCase(
        "sigmoid",
        "±inf: 0 and 1, zero gradients",
        ops.sigmoid,
        torch.sigmoid,
        (_t(-_INF, _INF),),
        [0.0, 1.0],
        [0.0, 0.0],
    ),
    SpecialCase(
        "log_sigmoid",
        "±inf: -inf and 0, gradients 1 and 0",
        ops.log_sigmoid,
        F.logsigmoid,
        (_t(-_INF, _INF),),
        [-_INF, 0.0],
        [1.0, 0.0],
    ),
    SpecialCase(
        "softplus",
        "±inf: 0 and +inf, gradients 0 and 1",
        lambda x: ops.softplus(x, beta=SOFTPLUS_BETA),
        lambda x: F.softplus(x, beta=SOFTPLUS_BETA),
        (_t(-_INF, _INF),),
        [0.0, _INF],
        [0.0, 1.0],
    ),
    SpecialCase(
        "softcap",
        "±inf: ±cap, zero gradients",
        lambda x: ops.softcap(x, SOFTCAP),
        None,
        (_t(-_INF, _INF),),
        [-SOFTCAP, SOFTCAP],
        [0.0, 0.0],
    ),
    SpecialCase(
        "softmax",
        "fully masked row: zeros, zero gradient",
        lambda x, mask: ops.softmax(x, -1, mask=mask),
        _masked_torch_softmax,
        (_rows([1.0, 2.0, 3.0]), _NO_MASK),
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
    ),
    SpecialCase(
        "softmax",
        "all -inf row: zeros, zero gradient",
        lambda x: ops.softmax(x, -1),
        lambda x: torch.softmax(x, -1),
        (_ALL_NEG_INF,),
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
    ),
    SpecialCase(
        "softmax",
        "two +inf entries: 1/2 each",
        lambda x: ops.softmax(x, -1),
        lambda x: torch.softmax(x, -1),
        (_rows([_INF, 0.0, _INF]),),
        [0.5, 0.0, 0.5],
    ),
    SpecialCase(
        "log_softmax",
        "fully masked row: -inf, zero gradient",
        lambda x, mask: ops.log_softmax(x, -1, mask=mask),
        _masked_torch_log_softmax,
        (_rows([1.0, 2.0, 3.0]), _NO_MASK),
        [-_INF, -_INF, -_INF],
        [0.0, 0.0, 0.0],
    ),
    SpecialCase(
        "cross_entropy",
        "every target ignored, mean: 0, zero gradient",
        lambda x, t: ops.cross_entropy(x, t),
        F.cross_entropy,
        (_rows([1.0, 2.0], [3.0, -1.0]), torch.tensor([-100, -100])),
        [0.0],
        [0.0, 0.0, 0.0, 0.0],
    ),
    SpecialCase(
        "compensated_sum",
        "inf entry: inf",
        lambda x: ops.compensated_sum(x, -1),
        lambda x: torch.sum(x, -1),
        (_rows([1.0, _INF, -2.0]),),
        [_INF],
    ),
    SpecialCase(
        "l2_norm",
        "zero vector: 0, zero gradient",
        lambda x: ops.l2_norm(x, -1),
        lambda x: torch.linalg.vector_norm(x, dim=-1),
        (_rows([0.0, 0.0, 0.0]),),
        [0.0],
        [0.0, 0.0, 0.0],
    ),
    SpecialCase(
        "safe_sqrt",
        "x = 0: 0, zero gradient",
        ops.safe_sqrt,
        torch.sqrt,
        (_t(0.0),),
        [0.0],
        [0.0],
    ),
    SpecialCase(
        "safe_sqrt",
        "x < 0: 0, zero gradient",
        ops.safe_sqrt,
        torch.sqrt,
        (_t(-1.0),),
        [0.0],
        [0.0],
    ),
    SpecialCase(
        "safe_log",
        "x = 0: log(smallest normal), zero gradient",
        ops.safe_log,
        torch.log,
        (_t(0.0),),
        _safe_log_floor,
        [0.0],
    ),
    SpecialCase(
        "safe_div",
        "b = 0: a / sqrt(smallest normal), finite gradients",
        ops.safe_div,
        torch.div,
        (_t(1.0), _t(0.0)),
        _safe_div_clamp,
        _safe_div_gradient,
        (0, 1),
    ),
)
"""Every specified edge case, grouped by op in the order of the audit table."""


def check_special(case: SpecialCase, dtype: torch.dtype) -> SpecialResult:
    """Run ``case`` in ``dtype`` with finite and with PyTorch's equivalent."""
    fmt = get_format(dtype)
    finite_ok, finite_output = _check(case, case.finite, fmt)
    torch_ok = torch_output = None
    if case.torch is not None:
        torch_ok, torch_output = _check(case, case.torch, fmt)
    return SpecialResult(
        case.op,
        case.description,
        str(dtype).removeprefix("torch."),
        finite_ok,
        torch_ok,
        finite_output,
        torch_output,
    )


def _check(
    case: SpecialCase, fn: Implementation, fmt: FloatFormat
) -> tuple[bool, tuple[float, ...]]:
    dtype = fmt.torch_dtype
    assert dtype is not None  # every audited format is a torch dtype
    args = [
        a.to(dtype).requires_grad_(i in case.differentiable) if a.dtype.is_floating_point else a
        for i, a in enumerate(case.args)
    ]
    out = fn(*args)
    value = out.detach().to(torch.float64).flatten()
    ok = _matches(out.detach(), _expected(case.value, fmt), dtype)
    gradient = torch.empty(0, dtype=torch.float64)
    if case.gradient is not None:
        inputs = [args[i] for i in case.differentiable]
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
        flat = torch.cat(
            [
                (torch.zeros_like(a) if g is None else g).flatten()
                for a, g in zip(inputs, grads, strict=True)
            ]
        )
        gradient = flat.detach().to(torch.float64)
        ok = ok and _matches(flat.detach(), _expected(case.gradient, fmt), dtype)
    return ok, tuple(torch.cat([value, gradient]).tolist())


def _expected(expected: Expected, fmt: FloatFormat) -> torch.Tensor:
    values = expected(fmt) if callable(expected) else expected
    return torch.tensor(values, dtype=torch.float64)


def _matches(result: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    result = result.flatten()
    if result.numel() != expected.numel():
        return False
    nan_expected = expected.isnan()
    if not torch.equal(result.isnan(), nan_expected):
        return False
    errors, nonfinite = ulp_error(
        result[~nan_expected],
        expected[~nan_expected],
        torch.zeros_like(expected[~nan_expected]),
        dtype,
    )
    return not bool(nonfinite.any()) and bool((errors <= 1).all())
