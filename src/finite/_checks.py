"""Argument checks shared by the public API.

Every public function validates its tensors with these helpers so that bad
input fails early with an error that names the argument and what was given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def require_float_tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a real floating-point tensor, else raise.

    Raises
    ------
    TypeError
        If ``x`` is not a ``torch.Tensor`` or its dtype is integer, bool or complex.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    return x


def normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    """Return ``dim`` as a non-negative index into a tensor with ``ndim`` dims.

    A 0-d tensor accepts ``dim`` in ``{-1, 0}``, as in PyTorch.
    """
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    size = max(ndim, 1)
    if not -size <= dim < size:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimension(s)")
    return dim % size


def normalize_dims(
    dim: int | Sequence[int] | None, ndim: int, name: str = "dim"
) -> tuple[int, ...]:
    """Return ``dim`` (an int, a sequence of ints or ``None`` for all) as sorted indices."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    normalized = tuple(normalize_dim(d, ndim, name) for d in dims)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name}={dim!r} names the same dimension more than once")
    return tuple(sorted(normalized))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: float32 for float16/bfloat16 (and fp8), else ``dtype``.

    Low-precision inputs are accumulated in float32 and rounded once at the end.
    """
    if dtype in _LOW_PRECISION or dtype.itemsize == 1:
        return torch.float32
    return dtype


def require_choice(value: object, choices: Sequence[object], name: str) -> None:
    """Raise ``ValueError`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
