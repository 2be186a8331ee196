"""How accurate are finite's ops, PyTorch's and the textbook formulas? Measured in ULPs.

:func:`run_audit` evaluates every op of :mod:`finite.ops` on seeded inputs that cover
its hard cases, in float64, float32, bfloat16 and float16, and compares the values and
gradients of three implementations (finite's, PyTorch's nearest equivalent, the naive
formula) with a high-precision reference computed on the exact rounded inputs (mpmath at
50 digits, exact rationals for sums). :func:`run_special_cases` checks the specified
behaviour at the edges (infinities, empty masks, ignored targets). ``finite audit``
prints both; the table is in ``docs/accuracy.md``.
"""

from finite.audit.cases import CASES, AuditCase
from finite.audit.run import DEFAULT_SAMPLES, DTYPES, AuditRow, run_audit, run_special_cases
from finite.audit.specials import SPECIAL_CASES, SpecialCase, SpecialResult
from finite.audit.targets import (
    FLOAT64_CANCELLATION_OPS,
    is_documented_exception,
    meets_target,
    target_ulp,
)
from finite.audit.ulp import ErrorStats, summarize, ulp, ulp_error

__all__ = [
    "CASES",
    "DEFAULT_SAMPLES",
    "DTYPES",
    "FLOAT64_CANCELLATION_OPS",
    "SPECIAL_CASES",
    "AuditCase",
    "AuditRow",
    "ErrorStats",
    "SpecialCase",
    "SpecialResult",
    "is_documented_exception",
    "meets_target",
    "run_audit",
    "run_special_cases",
    "summarize",
    "target_ulp",
    "ulp",
    "ulp_error",
]
