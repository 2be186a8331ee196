"""The accuracy targets of finite.ops, measured by the audit against an mpmath reference.

For every op and dtype, on the seeded audit domains (``finite audit`` with its defaults,
the table in docs/accuracy.md):

* finite's values are within 2 ULP (float64, float32) or 1 ULP (bfloat16, float16) of
  the exact result, and its gradients within 4 ULP (float64, float32) or 1 ULP;
* finite never returns inf or NaN where the exact result is finite;
* finite is never worse than PyTorch's nearest equivalent (largest error), unless both
  are within the target;
* the specified edge cases (infinities, fully masked rows, ignored targets, zero) hold,
  gradients included.

The references (finite.audit.references) are the mathematical definitions evaluated in
50-digit or exact rational arithmetic; they never call finite.ops. float32 and bfloat16
run by default, float64 and float16 are marked slow.
"""

import functools

import pytest
import torch

from finite.audit import (
    CASES,
    DEFAULT_SAMPLES,
    SPECIAL_CASES,
    AuditRow,
    is_documented_exception,
    run_audit,
    target_ulp,
)
from finite.audit.specials import check_special

SEED = 0
FAST_DTYPES = ("float32", "bfloat16")
SLOW_DTYPES = ("float64", "float16")
QUANTITIES = ("forward", "gradient")


def _dtype_params(names):
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW_DTYPES else name
        for name in names
    ]


DTYPE_PARAMS = _dtype_params(FAST_DTYPES + SLOW_DTYPES)


@functools.cache
def _rows(op: str, dtype: str) -> dict[str, AuditRow]:
    rows = run_audit([op], [dtype], samples=DEFAULT_SAMPLES, seed=SEED)
    return {row.quantity: row for row in rows}


def _describe(row: AuditRow) -> str:
    f = row.finite
    return (
        f"{row.op} {row.dtype} {row.quantity}: max {f.max_ulp:.4g} ULP, p99 {f.p99_ulp:.4g}, "
        f"{f.nonfinite} non-finite of {f.count}"
    )


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("op", list(CASES))
def test_finite_is_within_the_ulp_target(op, dtype, quantity):
    if is_documented_exception(op, dtype, quantity):
        pytest.skip("float64 cancellation: bounded in ULPs of the terms, see test_ops_logspace.py")
    row = _rows(op, dtype)[quantity]
    assert row.finite.max_ulp <= target_ulp(dtype, quantity), _describe(row)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("op", list(CASES))
def test_finite_gives_no_inf_or_nan_where_the_result_is_finite(op, dtype, quantity):
    row = _rows(op, dtype)[quantity]
    assert row.finite.nonfinite == 0, _describe(row)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("op", [name for name, case in CASES.items() if case.torch is not None])
def test_finite_is_never_worse_than_torch(op, dtype, quantity):
    row = _rows(op, dtype)[quantity]
    allowed = max(row.torch.max_ulp, target_ulp(dtype, quantity))
    assert row.finite.max_ulp <= allowed, f"{_describe(row)}; torch max {row.torch.max_ulp:.4g} ULP"
    assert row.finite.nonfinite <= row.torch.nonfinite


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize(
    "case", SPECIAL_CASES, ids=[f"{c.op}: {c.description}" for c in SPECIAL_CASES]
)
def test_specified_edge_case_holds(case, dtype):
    result = check_special(case, getattr(torch, dtype))
    assert result.finite, f"{case.op}, {case.description}: got {result.finite_output}"
