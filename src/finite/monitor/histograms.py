"""Histograms of log2 magnitudes (exponent histograms), binned against a format's limits.

A value ``x`` goes into the bin of ``floor(log2|x|)``, read exactly from the float's
exponent (``torch.frexp``), so a power of two is never misplaced by a rounded logarithm.
The regular bins cover every binade of the format (subnormal and normal) plus
:data:`MARGIN_BINADES` on either side, so a plot can shade where values would flush to
zero, lose precision as subnormals, or overflow.

Bin layout of a histogram of ``nbins = (high - low) + 4`` counts::

    0              |x| == 0
    1              0 < |x| < 2**low
    2 + (k - low)  2**k <= |x| < 2**(k + 1)   for k = low .. high - 1
    nbins - 2      2**high <= |x| (finite)
    nbins - 1      inf and NaN
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from finite.formats import FloatFormat

__all__ = ["MARGIN_BINADES", "HistogramBins", "log2_histogram"]

#: Binades shown beyond the format's smallest subnormal and largest normal value.
MARGIN_BINADES = 8


@dataclass(frozen=True)
class HistogramBins:
    """The binning of log2-magnitude histograms for one format.

    Attributes
    ----------
    low, high : int
        Regular bins are ``[2**k, 2**(k+1))`` for ``k`` in ``range(low, high)``.
    bands : dict
        ``log2|x|`` intervals ``(start, end)`` of what rounding to the format does:
        ``"zero"`` (flushes to 0: ``|x| <= min_subnormal / 2``), ``"subnormal"``,
        ``"normal"`` and ``"overflow"`` (``|x| > max``).
    """

    low: int
    high: int
    bands: dict[str, tuple[float, float]]

    @property
    def nbins(self) -> int:
        return self.high - self.low + 4

    @property
    def exponents(self) -> list[int]:
        """``k`` of each regular bin ``[2**k, 2**(k+1))``, in order."""
        return list(range(self.low, self.high))

    @classmethod
    def for_format(cls, fmt: FloatFormat) -> HistogramBins:
        smallest = math.log2(fmt.min_subnormal)
        largest = math.log2(fmt.max)
        bands = {
            "zero": (-math.inf, smallest - 1.0),
            "subnormal": (smallest - 1.0, math.log2(fmt.min_normal)),
            "normal": (math.log2(fmt.min_normal), largest),
            "overflow": (largest, math.inf),
        }
        return cls(
            low=math.floor(smallest) - MARGIN_BINADES,
            high=math.floor(largest) + 1 + MARGIN_BINADES,
            bands=bands,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "low": self.low,
            "high": self.high,
            "bands": {k: list(v) for k, v in self.bands.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> HistogramBins:
        bands = {k: (float(v[0]), float(v[1])) for k, v in data["bands"].items()}
        return cls(low=int(data["low"]), high=int(data["high"]), bands=bands)


def log2_histogram(x: torch.Tensor, bins: HistogramBins) -> torch.Tensor:
    """Counts of ``x``'s elements in each bin of ``bins`` (int64 device tensor, ``nbins``).

    float16/bfloat16 values are widened to float32 first (exactly). Does not synchronise.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    a = x.abs().reshape(-1)
    _, exponent = torch.frexp(a)  # |x| = m * 2**e with m in [0.5, 1): floor(log2|x|) = e - 1
    index = (exponent.to(torch.int64) - 1 - bins.low + 2).clamp_(1, bins.nbins - 2)
    index = index.masked_fill_(a == 0, 0).masked_fill_(~a.isfinite(), bins.nbins - 1)
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=bins.nbins)
    # CUDA's bincount reads the largest index back to size its output: accumulate instead.
    counts = torch.zeros(bins.nbins, dtype=torch.int64, device=index.device)
    one = torch.ones((), dtype=torch.int64, device=index.device)
    return counts.index_put_((index,), one, accumulate=True)
