"""Statistics of activations, gradients and updates, computed on the device.

Every function here returns device tensors and never reads a value back to the host:
the monitor collects the results and reads them all at once every ``sync_every`` steps.

Kernels are few per tensor, because on a loaded CPU each parallel kernel costs about as
much as a pass over the data: one ``aminmax`` per tensor at a module boundary (its min
and max are both finite exactly when every element is, since it propagates NaN), and a
handful more for leaf outputs and parameter gradients on measured steps. Counts avoid
boolean temporaries (slow to reduce on CPU): ``x * 0`` is 0 for finite ``x`` and NaN
otherwise, so ``count_nonzero(x * 0)`` counts the non-finite elements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from finite._checks import compute_dtype
from finite.formats import FloatFormat

__all__ = [
    "SATURATION_DERIVATIVE",
    "Scratch",
    "UnderflowThresholds",
    "count_nonfinite",
    "count_totals",
    "flag_sum",
    "gradient_norms",
    "gradient_stats",
    "leaf_stats",
    "snapshot",
    "summarize",
    "update_stats",
]

#: Columns of :func:`summarize`.
SUMMARY_COLUMNS = ("min", "max")
#: Columns of :func:`leaf_stats`.
LEAF_COLUMNS = ("sumsq", "nonfinite", "dead_units", "saturated")
#: Columns of :func:`gradient_stats`.
GRADIENT_COLUMNS = ("norm", "min", "max")
#: Count columns of :func:`gradient_stats`.
GRADIENT_COUNT_COLUMNS = ("nonzero", "flushed_or_zero", "below_normal", "finite")

#: A sigmoid/tanh output is saturated where its local derivative is below this fraction of
#: the derivative's maximum (0.25 for sigmoid at 0, 1 for tanh at 0): the gradient passing
#: through it is scaled down more than a hundredfold.
SATURATION_DERIVATIVE = 0.01


def summarize(x: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of ``x`` as a float32 device tensor (one ``aminmax``).

    Both are NaN when ``x`` holds a NaN, and one is infinite when it holds an inf, so
    they are both finite exactly when every element is. An empty tensor gives
    ``[+inf, -inf]`` (read as finite by the monitor: it has no element).
    """
    if x.numel() == 0:
        infinity = torch.full((), math.inf, device=x.device)
        return torch.stack((infinity, -infinity))
    return torch.stack(torch.aminmax(x.detach())).float()


def flag_sum(x: torch.Tensor) -> torch.Tensor:
    """``[sum(x)]`` accumulated in float32 (float64 stays float64): a non-finite flag.

    The cheapest full reduction: inf and NaN always reach the sum (``inf - inf`` is NaN),
    so it is non-finite whenever ``x`` is; a finite tensor is flagged only if its sum
    overflows (``|sum| > 3.4e38``, beyond any sensible gradient).
    """
    return x.detach().sum(dtype=compute_dtype(x.dtype)).float().reshape(1)


def unit_dim(x: torch.Tensor, channels_first: bool) -> int:
    """The dimension that indexes units (features, channels) of an activation.

    Channels (dim 1) for tensors of 4 or more dimensions (images, volumes) and for 3-d
    tensors that came out of a 1-d convolution or normalisation (``channels_first``);
    otherwise the last dimension (``(batch, features)``, ``(batch, sequence, features)``).
    """
    if x.dim() >= 4 or (x.dim() == 3 and channels_first):
        return 1
    return x.dim() - 1


class Scratch:
    """Reusable output buffers, so that per-step temporaries do not hit the allocator."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < x.numel():
            buffer = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
            self._buffers[key] = buffer
        return buffer[: x.numel()].view(x.shape)


def count_nonfinite(x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """Number of inf/NaN elements of ``x`` (int64 device scalar)."""
    if scratch is None:
        return torch.count_nonzero(x * 0)
    return torch.count_nonzero(torch.mul(x, 0, out=scratch.like(x)))


def leaf_stats(
    y: torch.Tensor,
    kind: str | None,
    channels_first: bool = False,
    scratch: Scratch | None = None,
    count: bool = True,
) -> torch.Tensor:
    """``[sum of squares, non-finite]`` of a leaf module's output, and one more entry.

    With ``count=False`` the non-finite entry is -1 (not counted), saving two passes.

    ``kind`` ``"relu"`` appends the number of dead units (zero across the whole batch:
    every position except the unit dimension, see :func:`unit_dim`); ``"sigmoid"`` or
    ``"tanh"`` append the number of saturated elements (local derivative below
    :data:`SATURATION_DERIVATIVE` of its maximum). float16/bfloat16 outputs are
    accumulated in float32. Returns a float32 device tensor of 2 or 3 entries.
    """
    y = y.detach()
    dtype = compute_dtype(y.dtype)
    sumsq = torch.linalg.vector_norm(y, dtype=dtype).float().square()
    nonfinite = count_nonfinite(y, scratch).float() if count else torch.full_like(sumsq, -1.0)
    entries = [sumsq, nonfinite]
    if kind == "relu" and y.dim() > 0 and y.numel() > 0:
        units = y.movedim(unit_dim(y, channels_first), -1)
        units = units.reshape(-1, units.shape[-1])
        # ReLU outputs are >= 0, so a unit is dead exactly when its largest value is 0.
        alive = torch.count_nonzero(units.amax(0))
        entries.append((units.shape[1] - alive).float())
    elif kind in ("sigmoid", "tanh") and y.numel() > 0:
        # sigmoid' = s(1 - s) < 0.01 * 1/4  <=>  |s - 1/2| > sqrt(1 - 0.01) / 2;
        # tanh' = 1 - t**2 < 0.01           <=>  |t| > sqrt(1 - 0.01).
        half_width = math.sqrt(1.0 - SATURATION_DERIVATIVE)
        centred = y.to(dtype)
        if kind == "sigmoid":
            centred = centred - 0.5
            half_width /= 2.0
        # |c| - w > 0 exactly when |c| > w: with gradual underflow a - b == 0 iff a == b.
        beyond = centred.abs().sub_(half_width).clamp_(min=0)
        entries.append(torch.count_nonzero(beyond).float())
    return torch.stack(entries)


class UnderflowThresholds:
    """Magnitudes that sort values by what rounding to a format does to them.

    Round to nearest, ties to even: ``|x| <= flush = min_subnormal / 2`` rounds to 0 (the
    tie goes to the even 0), and ``|x| >= normal = min_normal - min_subnormal / 2``
    rounds to a normal value (the tie goes to the even ``min_normal``); both are exact
    in float32 for the formats narrower than float32 (for float32 itself ``flush``
    rounds to 0 and nothing is flushed). ``largest`` is the compute dtype's maximum:
    ``|x| <= largest`` is false exactly for inf and NaN.
    """

    def __init__(self, fmt: FloatFormat, dtype: torch.dtype) -> None:
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.flush = float(np_dtype(fmt.min_subnormal / 2))
        self.normal = float(np_dtype(fmt.min_normal - fmt.min_subnormal / 2))
        self.largest = float(np.finfo(np_dtype).max)


def gradient_norms(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each gradient, accumulated in float32 (float64 stays float64).

    A norm is non-finite when its gradient holds inf/NaN (or, for a finite gradient, when
    its sum of squares overflows float32, above about ``1.8e19``).
    """
    by_dtype: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault((g.device, compute_dtype(g.dtype)), []).append(i)
    norms: list[torch.Tensor | None] = [None] * len(grads)
    for (_, dtype), indices in by_dtype.items():
        group = [grads[i] for i in indices]
        for i, norm in zip(indices, torch._foreach_norm(group, 2, dtype=dtype), strict=True):
            norms[i] = norm.float()
    return norms  # type: ignore[return-value]


def gradient_stats(
    grads: Sequence[torch.Tensor],
    thresholds: dict[torch.dtype, UnderflowThresholds],
    scratch: Scratch | None = None,
    count_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gradient ``[norm, min, max]`` (float32) and element counts (int64).

    The counts are ``[non-zero, |g| <= flush, |g| < normal, |g| <= largest]`` (see
    :class:`UnderflowThresholds`; NaN fails every comparison and counts as non-zero);
    :func:`count_totals` turns them into ``[zero, underflow, subnormal, normal,
    non-finite]``. ``min``/``max`` are NaN when the gradient holds a NaN. With
    ``count_finite=False`` the last count is -1 (not taken; it is the number of elements
    whenever ``min`` and ``max`` are finite). Returns tensors of shape
    ``(len(grads), 3)`` and ``(len(grads), 4)``.
    """
    norms = gradient_norms(grads)
    extremes, counts = [], []
    for g, norm in zip(grads, norms, strict=True):
        dtype = compute_dtype(g.dtype)
        limits = thresholds[dtype]
        flat = g.detach().reshape(-1)
        if flat.numel() == 0:
            zero = norm.new_zeros(())
            extremes.append(torch.stack((norm, zero, zero)))
            counts.append(torch.zeros(4, dtype=torch.int64, device=flat.device))
            continue
        low, high = torch.aminmax(flat)
        extremes.append(torch.stack((norm, low.float(), high.float())))
        a = flat.to(dtype).abs() if scratch is None else torch.abs(flat, out=scratch.like(flat))
        if a.dtype != dtype:
            a = a.to(dtype)
        nonzero = torch.count_nonzero(a)
        # A format at least as wide as the gradient flushes nothing (flush rounds to 0):
        # |g| <= 0 are the zeros, already counted.
        zero_or_flushed = (
            torch.count_nonzero(a <= limits.flush) if limits.flush > 0 else a.numel() - nonzero
        )
        counts.append(
            torch.stack(
                (
                    nonzero,
                    zero_or_flushed,
                    torch.count_nonzero(a < limits.normal),
                    torch.count_nonzero(a <= limits.largest)
                    if count_finite
                    else torch.full_like(nonzero, -1),
                )
            )
        )
    if not extremes:
        return torch.zeros((0, 3)), torch.zeros((0, 4), dtype=torch.int64)
    return torch.stack(extremes), torch.stack(counts)


def count_totals(counts: np.ndarray, numel: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """``(n, 4)`` counts of :func:`gradient_stats` -> ``(n, 5)`` ``[zero, underflow,
    subnormal, normal, non-finite]`` (float; NaN where a count was not taken).

    ``numel`` are the gradients' sizes and ``finite`` whether their min and max were
    finite (then every element is, whatever the last count says).
    """
    counts = counts.astype(np.float64)
    nonzero, flushed, below_normal, finite_count = (counts[:, i] for i in range(4))
    finite_count = np.where(finite, numel, np.where(finite_count < 0, np.nan, finite_count))
    zero = numel - nonzero
    return np.stack(
        (
            zero,
            flushed - zero,
            below_normal - flushed,
            finite_count - below_normal,
            numel - finite_count,
        ),
        axis=1,
    )


def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``params`` (one foreach call), to diff against after the optimizer step."""
    return list(torch._foreach_add([p.detach() for p in params], 0))


def update_stats(before: list[torch.Tensor], after: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``|w_after - w_before|`` (L2, float32) per parameter; consumes ``before``.

    ``before`` are :func:`snapshot` copies taken before ``optimizer.step()`` (the
    difference is formed in them, in place; float16/bfloat16 are widened to float32
    first, exactly, so that the difference is exact), ``after`` the parameters.
    """
    after = [a.detach() for a in after]
    same = [i for i, b in enumerate(before) if compute_dtype(b.dtype) == b.dtype]
    if same:
        torch._foreach_sub_([before[i] for i in same], [after[i] for i in same])
    deltas = list(before)
    for i, b in enumerate(before):
        if compute_dtype(b.dtype) != b.dtype:
            deltas[i] = b.to(compute_dtype(b.dtype)).sub_(after[i])
    return gradient_norms(deltas)
