"""The accuracy targets finite's ops are held to, in ULPs of the audited dtype.

float64 and float32: values within 2 ULP, gradients within 4 ULP of the exact result.
float16 and bfloat16, computed in float32 and rounded once: values and gradients within
1 ULP, one of the two neighbours of the exact result.
"""

from __future__ import annotations

import torch

__all__ = ["meets_target", "target_ulp"]

_WIDE = {"forward": 2.0, "gradient": 4.0}
_NARROW = {"forward": 1.0, "gradient": 1.0}


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


def meets_target(max_ulp: float, nonfinite: int, dtype: torch.dtype | str, quantity: str) -> bool:
    """Whether an implementation's largest error and non-finite count meet the target."""
    return nonfinite == 0 and max_ulp <= target_ulp(dtype, quantity)
