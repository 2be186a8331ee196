"""Row layout shared by the reductions: the reduced dims as the last axis of a matrix,
processed in blocks of rows with reusable scratch buffers.

Every reduction in :mod:`finite.ops` views its input as a (kept elements, reduced
elements) matrix, works on it row by row, and reshapes the per-row result back. On CPU
the rows are processed in blocks whose scratch buffers are allocated once and reused:
a fresh full-size temporary per step costs more in page faults than the arithmetic done
in it. On CUDA the caching allocator makes temporaries cheap and the blocks only bound
the scratch memory. Under :func:`torch.compile` there is one block, so the graph has no
Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from finite._checks import normalize_dims, require_float_tensor

__all__ = ["Scratch", "as_rows", "from_rows", "kept_shape", "row_blocks"]


def as_rows(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` as (kept elements, reduced elements), the reduced ``dims`` moved last.

    ``dims`` are sorted non-negative indices. A view whenever the layout allows; a 0-d
    tensor is one row of one element.
    """
    if t.ndim == 0:
        return t.reshape(1, 1)
    kept = tuple(d for d in range(t.ndim) if d not in dims)
    rows = math.prod([t.shape[d] for d in kept])
    cols = math.prod([t.shape[d] for d in dims])
    return t.permute(kept + dims).reshape(rows, cols)


def from_rows(t2: torch.Tensor, shape: torch.Size, dims: tuple[int, ...]) -> torch.Tensor:
    """Undo :func:`as_rows` for a matrix of its shape: a view of ``t2`` in ``shape``."""
    if len(shape) == 0:
        return t2.reshape(())
    kept = tuple(d for d in range(len(shape)) if d not in dims)
    perm = kept + dims
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return t2.reshape([shape[d] for d in perm]).permute(inverse)


def kept_shape(shape: torch.Size, dims: tuple[int, ...], keepdim: bool) -> tuple[int, ...]:
    """The shape of a reduction of ``shape`` over ``dims``."""
    if keepdim:
        return tuple(1 if d in dims else n for d, n in enumerate(shape))
    return tuple(n for d, n in enumerate(shape) if d not in dims)


def check_reduction_args(
    x: object, dim: int | Sequence[int] | None, keepdim: object
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Validate a reduction's ``x``, ``dim`` and ``keepdim``; return ``x`` and the dims."""
    x = require_float_tensor(x, "x")
    if not isinstance(keepdim, bool):
        raise TypeError(f"keepdim must be a bool, got {type(keepdim).__name__}")
    if not (dim is None or isinstance(dim, (int, tuple, list))):
        raise TypeError(f"dim must be an int, a sequence of ints or None, got {dim!r}")
    if isinstance(dim, (tuple, list)) and len(dim) == 0:
        raise ValueError("dim=() is ambiguous; pass dim=None to reduce over every dimension")
    return x, normalize_dims(dim, x.ndim)


def row_blocks(
    rows: int,
    cols: int,
    device: torch.device,
    *,
    cpu_elements: int,
    cuda_elements: int | None = None,
) -> list[slice]:
    """Slices of about ``cpu_elements`` (on CUDA ``cuda_elements``, ``None`` for all)
    elements each, whole rows, covering ``rows`` rows; one block under compilation."""
    budget = cpu_elements if device.type == "cpu" else cuda_elements
    if budget is None or torch.compiler.is_compiling():
        step = max(rows, 1)
    else:
        step = max(1, budget // max(cols, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


class Scratch:
    """Named (block rows, cols) buffers of one dtype, allocated on first use and reused
    for every block; :meth:`get` returns the first ``rows`` rows of one."""

    def __init__(
        self, blocks: list[slice], cols: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        rows = blocks[0].stop - blocks[0].start if blocks else 0
        self.dtype = dtype
        self._shape = (rows, cols)
        self._device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self._shape, dtype=self.dtype, device=self._device)
        return self._buffers[name][:rows]
