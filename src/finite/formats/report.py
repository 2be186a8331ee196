"""What casting a tensor to a format would do to it: overflow, underflow, lost precision."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from finite._checks import compute_dtype, require_float_tensor
from finite.formats.float_format import FloatFormat, get_format
from finite.formats.rounding import _apply_range, _round_magnitude

# Elements examined at once: bounds the extra memory to the chunk's temporaries (about 40
# bytes per element, 0.65 GiB measured on CUDA for float32 input), whatever the tensor's size.
_CHUNK_NUMEL = 1 << 24


@dataclass(frozen=True)
class CastReport:
    """The effect of rounding a tensor to a format (see :func:`cast_report`).

    Attributes
    ----------
    format : str
        Name of the format the report is for.
    numel : int
        Number of elements examined.
    overflow : float
        Fraction of the finite elements whose rounded value exceeds ``fmt.max``: they
        become ``±inf``, or saturate to ``±fmt.max`` in formats without inf
        (float8_e4m3fn).
    underflow : float
        Fraction of the non-zero finite elements that round to zero.
    subnormal : float
        Fraction of the non-zero finite elements that round to a non-zero value below
        ``fmt.min_normal``, where the format has fewer significant bits.
    max_rel_error, mean_rel_error : float
        Largest and mean ``|round(x) - x| / |x|`` over the non-zero finite elements that
        round to a normal value of the format; NaN when there are none.
    headroom_bits : float
        ``log2(fmt.max / max|x|)`` over the finite elements: how many doublings the
        largest value can take before it exceeds the format (negative: it already
        does). ``+inf`` when every finite element is zero or there is none.
    already_nonfinite : float
        Fraction of all elements that are already inf or NaN before the cast.

    Fractions whose denominator is zero are 0.0.
    """

    format: str
    numel: int
    overflow: float
    underflow: float
    subnormal: float
    max_rel_error: float
    mean_rel_error: float
    headroom_bits: float
    already_nonfinite: float


def cast_report(x: torch.Tensor, fmt: str | torch.dtype | FloatFormat) -> CastReport:
    """Report what rounding ``x`` to ``fmt`` (round to nearest, even) would do to it.

    The rounding is :func:`round_to`'s, which agrees bit for bit with torch's cast from
    float32. float16, bfloat16 and fp8 input is widened to float32 (exactly); float64
    input is examined in float64. The tensor is processed in chunks of ``2**24``
    elements, so the extra memory stays bounded for any size (a non-contiguous tensor
    is copied one chunk at a time). Works on any device; the report is read back to
    the host once, at the end.

    Parameters
    ----------
    x : torch.Tensor
        Real floating-point tensor of any dtype, shape and device.
    fmt : str, torch.dtype or FloatFormat
        The target format, anything :func:`get_format` accepts.

    Returns
    -------
    CastReport
        Plain Python numbers; see :class:`CastReport` for each field's denominator.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor, or ``fmt`` has the wrong type.
    ValueError
        If ``fmt`` is not a known format.

    Examples
    --------
    >>> report = cast_report(torch.tensor([1e-9, 1.0, 1.0, 7e4]), "fp16")
    >>> report.overflow, report.underflow
    (0.25, 0.25)
    """
    x = require_float_tensor(x, "x")
    fmt = get_format(fmt)
    dtype = compute_dtype(x.dtype)
    counts = torch.zeros(6, dtype=torch.int64, device=x.device)
    rel_error_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    max_rel_error = torch.zeros((), dtype=torch.float64, device=x.device)
    max_magnitude = torch.zeros((), dtype=torch.float64, device=x.device)
    for chunk in _flat_chunks(x.detach(), _CHUNK_NUMEL):
        magnitude = chunk.to(dtype).abs()
        finite = magnitude.isfinite()
        magnitude = magnitude.where(finite, 0.0)
        unbounded = _round_magnitude(magnitude, fmt, "nearest", None)
        overflow = unbounded > fmt.max
        rounded = _apply_range(unbounded, fmt)
        nonzero = magnitude > 0
        stays_normal = nonzero & ~overflow & (rounded >= fmt.min_normal)
        # Exact numerator (the rounded value is within a factor 2 of x), one rounding.
        rel_error = ((rounded - magnitude).abs_() / magnitude).where(stays_normal, 0.0)
        counts += torch.stack(
            (
                finite.sum(),
                nonzero.sum(),
                overflow.sum(),
                (nonzero & (rounded == 0)).sum(),
                ((rounded > 0) & (rounded < fmt.min_normal)).sum(),
                stays_normal.sum(),
            )
        )
        rel_error_sum += rel_error.sum(dtype=torch.float64)
        max_rel_error = torch.maximum(max_rel_error, rel_error.max().double())
        max_magnitude = torch.maximum(max_magnitude, magnitude.max().double())

    # One read-back for the whole report; counts below 2**53 are exact in float64.
    float_totals = torch.stack((rel_error_sum, max_rel_error, max_magnitude))
    totals = torch.cat((counts.double(), float_totals))
    *integer_totals, rel_error_total, largest_rel_error, largest = totals.tolist()
    finite, nonzero, overflow, underflow, subnormal, normal = map(int, integer_totals)
    numel = x.numel()
    return CastReport(
        format=fmt.name,
        numel=numel,
        overflow=_fraction(overflow, finite),
        underflow=_fraction(underflow, nonzero),
        subnormal=_fraction(subnormal, nonzero),
        max_rel_error=largest_rel_error if normal else math.nan,
        mean_rel_error=rel_error_total / normal if normal else math.nan,
        headroom_bits=math.log2(fmt.max) - math.log2(largest) if largest > 0 else math.inf,
        already_nonfinite=_fraction(numel - finite, numel),
    )


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def _flat_chunks(x: torch.Tensor, chunk_numel: int) -> Iterator[torch.Tensor]:
    """1-D pieces of ``x`` of at most ``chunk_numel`` elements, together all of ``x`` once.

    Views for a contiguous tensor; otherwise copies of one block of leading-dimension
    slices at a time, so no more than one chunk is ever copied.
    """
    if x.is_contiguous() or x.dim() <= 1:
        flat = x.reshape(-1)
        for start in range(0, flat.numel(), chunk_numel):
            yield flat[start : start + chunk_numel]
        return
    rows_per_chunk = chunk_numel // max(x[0].numel(), 1)
    if rows_per_chunk == 0:
        for row in x:
            yield from _flat_chunks(row, chunk_numel)
        return
    for start in range(0, x.shape[0], rows_per_chunk):
        yield x[start : start + rows_per_chunk].reshape(-1)
