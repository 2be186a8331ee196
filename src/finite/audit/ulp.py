"""Errors in units in the last place (ULP) of a floating-point format, and their summary.

A reference value ``r`` is carried as an unevaluated sum ``hi + lo`` of two float64
numbers (``hi`` is ``r`` rounded to float64, ``lo`` the rounded remainder), which holds
about 106 bits: enough to measure a float64 result's error to a small fraction of an ULP.

Conventions
-----------
* ``ulp(r) = 2**(floor(log2|r|) - mantissa_bits)`` for ``|r|`` at least the smallest
  normal number of the format, and the subnormal spacing (the smallest subnormal) below
  it, ``r == 0`` included. So near zero the error is absolute, in units of the smallest
  subnormal: an exact 0 scores 0, the smallest subnormal where 0 is exact scores 1.
* ``error = |y - r| / ulp(r)``: a correctly rounded result scores at most 0.5, one of the
  two neighbours of ``r`` at most 1.
* Infinities: a result equal to the reference rounded to the format (``inf == inf`` of
  the same sign, including a reference beyond the largest finite value) scores 0. A
  non-finite result where the rounded reference is finite is *not* a number of ULPs: it
  is counted separately as non-finite. A wrong special value where the reference is
  infinite (NaN, or the other infinity) scores ``inf``.
* A NaN reference (outside the function's domain) is skipped.
* An error beyond the float64 range (possible only for float64 results near zero, in
  units of the smallest subnormal) is reported as the largest float64, 1.8e308.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from finite.formats import FloatFormat, get_format

__all__ = ["ErrorStats", "summarize", "ulp", "ulp_error"]


def ulp(ref_hi: torch.Tensor, ref_lo: torch.Tensor, fmt: FloatFormat | torch.dtype) -> torch.Tensor:
    """The spacing of ``fmt`` at the exact value ``ref_hi + ref_lo``, in float64.

    ``ref_hi`` is the float64 rounding of the value, so it can sit on a power of two that
    the value is just below; ``ref_lo`` of the opposite sign says so, and the binade below
    is used. Infinite or NaN ``ref_hi`` gives NaN.
    """
    fmt = get_format(fmt)
    binade = _binade(ref_hi.to(torch.float64))
    on_power_of_two = torch.exp2(binade) == ref_hi.abs()
    below_power_of_two = on_power_of_two & (ref_lo != 0) & (ref_lo.sign() != ref_hi.sign())
    binade = binade - below_power_of_two.to(torch.float64)
    min_binade = math.frexp(fmt.min_normal)[1] - 1
    binade = torch.where(ref_hi == 0, min_binade, binade.clamp(min=min_binade))
    spacing = torch.exp2(binade - fmt.mantissa_bits)
    return torch.where(ref_hi.isfinite(), spacing, math.nan)


def _binade(value: torch.Tensor) -> torch.Tensor:
    """``floor(log2|value|)`` exactly, as float64 (subnormal float64 values included).

    ``torch.frexp`` is not used: on CPU it can return the mantissa 1.0 for the float64
    just below a power of two (torch 2.x). ``log2`` can round up to the next integer
    there too, so its estimate is corrected against exact powers of two.
    """
    magnitude = value.abs()
    # Lift float64 subnormals into the normal range, where log2 is accurate.
    lift = 128.0
    small = magnitude < 2.0**-960
    magnitude = torch.where(small, magnitude * 2.0**lift, magnitude)
    estimate = torch.log2(magnitude).floor()
    estimate = torch.where(torch.exp2(estimate) > magnitude, estimate - 1, estimate)
    estimate = torch.where(torch.exp2(estimate + 1) <= magnitude, estimate + 1, estimate)
    return torch.where(small, estimate - lift, estimate)


def ulp_error(
    result: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors of ``result`` against the reference ``ref_hi + ref_lo``, in ULPs of ``dtype``.

    Returns
    -------
    (Tensor, Tensor)
        ``errors`` (float64, one per compared element; NaN references dropped, see the
        module docstring for infinities) and ``nonfinite`` (bool, same length): the
        elements where ``result`` is inf or NaN although the reference, rounded to
        ``dtype``, is finite. Those have error ``inf`` in ``errors`` and are meant to be
        reported as a count, not as a number of ULPs.
    """
    y = result.detach().to(torch.float64).flatten()
    hi, lo = ref_hi.flatten(), ref_lo.flatten()
    if not y.shape == hi.shape == lo.shape:
        raise ValueError(
            f"result has {y.numel()} elements but the reference has {hi.numel()} and {lo.numel()}"
        )
    defined = ~hi.isnan()
    y, hi, lo = y[defined], hi[defined], lo[defined]
    rounded = hi.to(dtype).to(torch.float64)
    # y - hi is exact when y and hi are within a factor of 2 (Sterbenz), the only case in
    # which the remainder lo matters.
    distance = ((y - hi) - lo).abs()
    # In float64 a wrong value where the reference is 0 can be more than 1.8e308 ULPs of
    # the smallest subnormal away: saturate, so that inf keeps its one meaning.
    errors = (distance / ulp(hi, lo, dtype)).clamp(max=torch.finfo(torch.float64).max)
    # Every comparison involving an infinity is right (0) or wrong (inf).
    special = ~y.isfinite() | ~hi.isfinite()
    errors = torch.where(special, torch.where(y == rounded, 0.0, math.inf), errors)
    nonfinite = ~y.isfinite() & rounded.isfinite()
    return errors, nonfinite


@dataclass(frozen=True)
class ErrorStats:
    """Summary of the errors of one implementation on one set of inputs.

    Attributes
    ----------
    max_ulp : float
        Largest error in ULPs over the elements with a finite result (``inf`` where a
        special value is wrong; 0 when there is no such element).
    p99_ulp : float
        99th percentile (nearest rank) of the same errors.
    nonfinite : int
        Elements whose result is inf or NaN where the correctly rounded reference is
        finite.
    count : int
        Elements compared.
    """

    max_ulp: float
    p99_ulp: float
    nonfinite: int
    count: int


def summarize(errors: torch.Tensor, nonfinite: torch.Tensor) -> ErrorStats:
    """:class:`ErrorStats` of the output of :func:`ulp_error` (or several, concatenated)."""
    numeric = errors[~nonfinite].sort().values
    if numeric.numel() == 0:
        return ErrorStats(0.0, 0.0, int(nonfinite.sum()), errors.numel())
    rank = max(math.ceil(0.99 * numeric.numel()), 1)
    return ErrorStats(
        max_ulp=float(numeric[-1]),
        p99_ulp=float(numeric[rank - 1]),
        nonfinite=int(nonfinite.sum()),
        count=errors.numel(),
    )
