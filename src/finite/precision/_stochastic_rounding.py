"""Stochastic rounding of float32 tensors to bfloat16 or float16 in one pass.

A value ``x`` between two neighbouring values ``lo < x < hi`` of the target format
rounds up with probability ``(x - lo) / (hi - lo)``, so ``E[round(x)] = x``: many updates
smaller than the format's spacing add up on average instead of being discarded.

float32 shares bfloat16's exponent layout and float16's layout above 2**-14, so rounding
there is integer arithmetic on the float32 bit pattern: add uniform random bits below the
target's last mantissa bit and truncate them; a carry out of the dropped bits is the
round-up. float16 subnormals sit on a fixed grid of spacing 2**-24 and are rounded with
``floor(x / spacing + u)``. Values outside the target's finite range (and NaN) round to
nearest, exactly as ``x.to(dtype)`` does, so stochastic rounding never turns a finite
weight into an infinity that round-to-nearest would not produce.

References
----------
.. [1] S. Gupta, A. Agrawal, K. Gopalakrishnan, P. Narayanan, "Deep Learning with Limited
   Numerical Precision", ICML 2015.
"""

from __future__ import annotations

import torch

_FLOAT32_MANTISSA_BITS = 23
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round a float32 tensor to ``dtype`` (bfloat16 or float16), unbiased.

    The rounding probability is resolved to 16 random bits for bfloat16 and 13 for
    float16 (the float32 mantissa bits the target drops), so ``|E[round(x)] - x|`` is
    below ``2**-13`` of the local spacing.
    Reproducible for a given ``generator`` state; ``generator`` must be on ``x.device``.
    """
    info = torch.finfo(dtype)
    dropped_bits = _FLOAT32_MANTISSA_BITS - _MANTISSA_BITS[dtype]
    noise = torch.randint(
        0, 1 << dropped_bits, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    has_own_subnormals = info.tiny > torch.finfo(torch.float32).tiny
    if has_own_subnormals:
        # Below the target's smallest normal its grid is fixed; the bit trick, which keeps
        # a fixed number of mantissa bits, would round to a finer grid there.
        spacing = info.tiny * info.eps
        uniform = noise.to(torch.float32).mul_(2.0**-dropped_bits)
        subnormal = uniform.add_(x, alpha=1.0 / spacing).floor_().mul_(spacing)
        subnormal = subnormal.copysign_(x)  # keeps the sign of values that round to zero
    rounded = noise.add_(x.view(torch.int32)).bitwise_and_(-(1 << dropped_bits))
    rounded = rounded.view(torch.float32)
    if has_own_subnormals:
        torch.where(x.abs() < info.tiny, subnormal, rounded, out=rounded)
    # NaN fails the comparison and takes the round-to-nearest branch too.
    torch.where(x.abs() <= info.max, rounded, x, out=rounded)
    return rounded.to(dtype)
