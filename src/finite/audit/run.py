"""Run the audit: every op, every dtype, forward and gradient, three implementations."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from finite.audit.cases import CASES, AuditCase, Implementation
from finite.audit.domains import Batch
from finite.audit.references import evaluate, to_hi_lo
from finite.audit.specials import SPECIAL_CASES, SpecialResult, check_special
from finite.audit.ulp import ErrorStats, summarize, ulp_error
from finite.formats import get_format

__all__ = ["DEFAULT_SAMPLES", "DTYPES", "AuditRow", "run_audit", "run_special_cases"]

DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
"""The audited dtypes, widest first."""

DEFAULT_SAMPLES = 4096
"""Default number of input elements per op and dtype."""

QUANTITIES = ("forward", "gradient")


@dataclass(frozen=True)
class AuditRow:
    """The errors of the three implementations of one op, in one dtype, for one quantity.

    Attributes
    ----------
    op : str
        Name of the op in :mod:`finite.ops`.
    dtype : str
        Audited dtype (``"float32"``, ...): of the inputs, the outputs and the ULPs.
    quantity : str
        ``"forward"`` (the op's values) or ``"gradient"`` (the cotangent-weighted
        gradient with respect to its floating-point inputs).
    finite : ErrorStats
        finite's implementation.
    torch : ErrorStats or None
        PyTorch's nearest equivalent; ``None`` where there is none.
    naive : ErrorStats or None
        The textbook formula in the input dtype; ``None`` where it is PyTorch's.
    """

    op: str
    dtype: str
    quantity: str
    finite: ErrorStats
    torch: ErrorStats | None
    naive: ErrorStats | None


@dataclass(frozen=True)
class _Prepared:
    """The inputs of one (op, dtype, samples, seed) and their references."""

    batches: tuple[Batch, ...]
    value_refs: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    gradient_refs: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def run_audit(
    ops: Sequence[str] | None = None,
    dtypes: Sequence[torch.dtype | str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> list[AuditRow]:
    """Measure finite's ops, PyTorch's equivalents and the naive formulas in ULPs.

    For each op and dtype, seeded inputs covering the op's hard cases (see
    :mod:`finite.audit.domains`) are rounded to the dtype; the reference is computed on
    their exact values in high precision (:mod:`finite.audit.references`) and each
    implementation's forward values and gradients are compared with it
    (:mod:`finite.audit.ulp`). Results are cached per (op, dtype, samples, seed) for the
    life of the process, references included.

    Parameters
    ----------
    ops : sequence of str, optional
        Op names (keys of :data:`finite.audit.CASES`); default all, in table order.
    dtypes : sequence of torch.dtype or str, optional
        Any of float64, float32, bfloat16, float16 (names or aliases such as ``"bf16"``);
        default all four.
    samples : int, default 4096
        Approximate number of input elements per op and dtype.
    seed : int, default 0
        Seed of the input generators.

    Returns
    -------
    list of AuditRow
        Ordered by op, then dtype, then forward before gradient.

    Raises
    ------
    ValueError
        If an op or dtype is unknown, or ``samples`` is not a positive integer.
    TypeError
        If ``seed`` or ``samples`` is not an int.

    Examples
    --------
    >>> from finite.audit import run_audit
    >>> row = run_audit(["log1mexp"], ["float32"], samples=64)[0]
    >>> row.finite.max_ulp <= 2, row.torch is None
    (True, True)
    """
    names = _check_ops(ops)
    dtype_list = _check_dtypes(dtypes)
    for value, name in ((samples, "samples"), (seed, "seed")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    rows = []
    for name in names:
        for dtype in dtype_list:
            rows.extend(_audit_one(CASES[name], dtype, samples, seed))
    return rows


def run_special_cases(
    ops: Sequence[str] | None = None, dtypes: Sequence[torch.dtype | str] | None = None
) -> list[SpecialResult]:
    """Check the specified edge cases (infinities, empty masks, ignored targets, zero) of
    finite's ops and PyTorch's equivalents; see :mod:`finite.audit.specials`.

    Parameters
    ----------
    ops, dtypes : sequence, optional
        As for :func:`run_audit`; default all.

    Returns
    -------
    list of SpecialResult
        Ordered by op, edge case, then dtype.

    Raises
    ------
    ValueError
        If an op or dtype is unknown.
    """
    names = set(_check_ops(ops))
    dtype_list = _check_dtypes(dtypes)
    return [
        check_special(case, dtype)
        for case in SPECIAL_CASES
        if case.op in names
        for dtype in dtype_list
    ]


def _check_ops(ops: Sequence[str] | None) -> list[str]:
    if ops is None:
        return list(CASES)
    if isinstance(ops, str):
        ops = [ops]
    unknown = [name for name in ops if name not in CASES]
    if unknown:
        raise ValueError(
            f"unknown op(s) {', '.join(map(repr, unknown))}; audited ops: {', '.join(CASES)}"
        )
    return list(dict.fromkeys(ops))


def _check_dtypes(dtypes: Sequence[torch.dtype | str] | None) -> list[torch.dtype]:
    if dtypes is None:
        return list(DTYPES)
    if isinstance(dtypes, (str, torch.dtype)):
        dtypes = [dtypes]
    audited = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
    result = []
    for dtype in dtypes:
        try:
            fmt = get_format(dtype)
        except (ValueError, TypeError):
            fmt = None
        if fmt is None or fmt.torch_dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not audited; audited dtypes: {audited}")
        result.append(fmt.torch_dtype)
    return list(dict.fromkeys(result))


def _audit_one(case: AuditCase, dtype: torch.dtype, samples: int, seed: int) -> list[AuditRow]:
    prepared = _prepare(case.name, dtype, samples, seed)
    columns = [_measure(case, fn, dtype, prepared) for fn in (case.finite, case.torch, case.naive)]
    finite, torch_column, naive = columns
    assert finite is not None  # every case has finite's implementation
    dtype_name = str(dtype).removeprefix("torch.")
    return [
        AuditRow(
            case.name,
            dtype_name,
            quantity,
            finite[index],
            None if torch_column is None else torch_column[index],
            None if naive is None else naive[index],
        )
        for index, quantity in enumerate(QUANTITIES)
    ]


@functools.cache
def _prepare(name: str, dtype: torch.dtype, samples: int, seed: int) -> _Prepared:
    case = CASES[name]
    # A stream per (op, dtype): adding an op or a dtype changes no other's inputs.
    stream = zlib.crc32(f"{name}/{dtype}/{seed}".encode())
    generator = torch.Generator().manual_seed(stream)
    batches = tuple(case.inputs(dtype, samples, generator))
    fmt = get_format(dtype)
    value_refs, gradient_refs = [], []
    for batch in batches:
        values, gradients = evaluate(case.reference, batch.args, batch.cotangent, fmt)
        value_refs.append(to_hi_lo(values))
        gradient_refs.append(to_hi_lo(gradients))
    return _Prepared(batches, tuple(value_refs), tuple(gradient_refs))


def _measure(
    case: AuditCase,
    fn: Implementation | None,
    dtype: torch.dtype,
    prepared: _Prepared,
) -> tuple[ErrorStats, ErrorStats] | None:
    """Forward and gradient :class:`ErrorStats` of ``fn`` over all batches."""
    if fn is None:
        return None
    value_errors, gradient_errors = [], []
    for batch, value_ref, gradient_ref in zip(
        prepared.batches, prepared.value_refs, prepared.gradient_refs, strict=True
    ):
        values, gradients = _run(fn, batch, case.differentiable)
        value_errors.append(ulp_error(values, *value_ref, dtype))
        gradient_errors.append(ulp_error(gradients, *gradient_ref, dtype))
    return _combine(value_errors), _combine(gradient_errors)


def _run(
    fn: Implementation, batch: Batch, differentiable: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn``'s output and its gradients (flattened, concatenated in argument order)."""
    args = [
        a.detach().clone().requires_grad_(i in differentiable) for i, a in enumerate(batch.args)
    ]
    out = fn(*args)
    inputs = [args[i] for i in differentiable]
    grads = torch.autograd.grad(out, inputs, batch.cotangent, allow_unused=True)
    flat = [
        (torch.zeros_like(a) if g is None else g).flatten()
        for a, g in zip(inputs, grads, strict=True)
    ]
    return out.detach(), torch.cat(flat)


def _combine(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> ErrorStats:
    errors = torch.cat([p[0] for p in parts])
    nonfinite = torch.cat([p[1] for p in parts])
    return summarize(errors, nonfinite)
