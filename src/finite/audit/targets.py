"""The accuracy targets finite's ops are held to, in ULPs of the audited dtype.

float64 and float32: values within 2 ULP, gradients within 4 ULP of the exact result.
float16 and bfloat16, computed in float32 and rounded once: values and gradients within
1 ULP, one of the two neighbours of the exact result.

One documented exception: the float64 values of the log-space ops in
:data:`FLOAT64_CANCELLATION_OPS`. Their result can be the difference of two terms of
order 1 that nearly cancel (``logsumexp([-0.50, -0.86]) = 0.028``); float64 has no wider
type, and with correctly rounded ``exp`` and ``log`` every float64 method is then off by
about half an ulp of the larger term, which is the condition number times the result's
ulp (up to ~600 ULP of the result on the audit's domains). Their float64 value target is
instead 2 ULP of ``max(1, |max input|, |log of the sum|)``, asserted by
``tests/test_ops_logspace.py``; the audit table marks them with a dagger.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT64_CANCELLATION_OPS", "is_documented_exception", "meets_target", "target_ulp"]

_WIDE = {"forward": 2.0, "gradient": 4.0}
_NARROW = {"forward": 1.0, "gradient": 1.0}

#: Ops whose float64 values have no fixed ULP target (see the module docstring).
FLOAT64_CANCELLATION_OPS = frozenset({"logsumexp", "logmeanexp", "logaddexp", "logsubexp"})


def is_documented_exception(op: str, dtype: torch.dtype | str, quantity: str) -> bool:
    """Whether ``op``'s ``quantity`` in ``dtype`` has a bound other than ULPs of the result."""
    name = str(dtype).removeprefix("torch.")
    return op in FLOAT64_CANCELLATION_OPS and name == "float64" and quantity == "forward"


def target_ulp(dtype: torch.dtype | str, quantity: str) -> float:
    """The largest error allowed for ``quantity`` (``"forward"`` or ``"gradient"``)."""
    name = str(dtype).removeprefix("torch.")
    if quantity not in _WIDE:
        raise ValueError(f"quantity must be 'forward' or 'gradient', got {quantity!r}")
    if name in ("float64", "float32"):
        return _WIDE[quantity]
    if name in ("float16", "bfloat16"):
        return _NARROW[quantity]
    raise ValueError(f"no accuracy target for dtype {name!r}")


def meets_target(
    max_ulp: float,
    nonfinite: int,
    dtype: torch.dtype | str,
    quantity: str,
    op: str | None = None,
) -> bool:
    """Whether an implementation's largest error and non-finite count meet the target.

    With ``op`` given, a documented exception (:func:`is_documented_exception`) is judged
    only on its non-finite count here: its own bound is not in ULPs of the result.
    """
    if op is not None and is_documented_exception(op, dtype, quantity):
        return nonfinite == 0
    return nonfinite == 0 and max_ulp <= target_ulp(dtype, quantity)
