"""A float32 view of float16/bfloat16 parameters for one optimizer step.

The parameters of one device and dtype are laid out in one flat float32 buffer (and their
gradients in another), so that every operation before and after the wrapped optimizer's
step is one kernel over the whole group instead of one kernel per parameter: with
hundreds of parameters the launches, not the arithmetic, would dominate the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from finite.formats.rounding import stochastic_round

# Counting materialises a bool mask and then an int64 copy of it (9 bytes per element on
# CUDA); chunks of 2**22 elements bound that scratch to 36 MiB.
_COUNT_CHUNK = 1 << 22


def _count_differences(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """Number of elements where the flat tensor ``a`` differs from ``b`` (0-d int64)."""
    b_chunks = b.split(_COUNT_CHUNK) if isinstance(b, torch.Tensor) else repeat(b)
    counts = [x.ne(y).sum() for x, y in zip(a.split(_COUNT_CHUNK), b_chunks, strict=False)]
    return torch.stack(counts).sum()


class Float32View:
    """Parameters of one device and dtype, given float32 data ``w + c`` and gradients.

    ``swap_in`` points each parameter's ``.data`` and ``.grad`` at its slice of the flat
    float32 buffers; ``swap_out`` gives the parameters their own storage and gradients
    back. The methods after that write the updated float32 weights back in the
    parameters' dtype. Memory: 8 bytes per element while swapped in (weights and
    gradients); at most 12 while counting lost updates and 13 while rounding
    stochastically.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], compensation: Sequence[torch.Tensor] | None
    ) -> None:
        self.params = list(params)
        self.compensation = None if compensation is None else list(compensation)
        self.weights = [p.data for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.weights32 = _flatten_dense_tensors(self.weights).to(torch.float32)
        if self.compensation is not None:
            self.weights32.add_(_flatten_dense_tensors(self.compensation))
        self.grads32 = _flatten_dense_tensors(self.grads).to(torch.float32)
        self._weight_views = _unflatten_dense_tensors(self.weights32, self.weights)

    def swap_in(self) -> None:
        grad_views = _unflatten_dense_tensors(self.grads32, self.grads)
        for p, weight, grad in zip(self.params, self._weight_views, grad_views, strict=True):
            p.data = weight
            p.grad = grad

    def swap_out(self) -> None:
        for p, view, weight, grad in zip(
            self.params, self._weight_views, self.weights, self.grads, strict=True
        ):
            if p.data.data_ptr() != view.data_ptr():  # the optimizer assigned new data
                view.copy_(p.data)
            p.data = weight
            p.grad = grad

    def count_lost_updates(self) -> torch.Tensor:
        """Elements whose update ``u`` is non-zero but ``round_nearest(w + u) == w``.

        Call after ``swap_out`` and before writing back. Returns a 0-d int64 tensor.
        """
        old32 = self.grads32  # the float32 gradients are spent: reuse their memory
        self.grads32 = None
        weights = _flatten_dense_tensors(self.weights)
        old32.copy_(weights)
        if self.compensation is not None:
            old32.add_(_flatten_dense_tensors(self.compensation))  # as in __init__
        minus_update = old32.sub_(self.weights32)
        changed = _count_differences(minus_update, 0.0)
        plain = minus_update.neg_().add_(weights).to(weights.dtype)  # w + u, rounded once
        return changed - _count_differences(plain, weights)

    def write_back_kahan(self) -> None:
        """``w = round_nearest(w32)``, ``c = round_nearest(w32 - w)``."""
        if self.compensation is None:
            raise RuntimeError("write_back_kahan needs the view built with compensation buffers")
        self.grads32 = None
        dtype = self.weights[0].dtype
        weights = self.weights32.to(dtype)
        # w32 - w is exact in float32: w is the 16-bit value nearest to w32, so the
        # difference is at most half its ulp and a multiple of w32's last float32 bit.
        compensation = self.weights32.sub_(weights).to(dtype)
        torch._foreach_copy_(self.weights, _unflatten_dense_tensors(weights, self.weights))
        torch._foreach_copy_(
            self.compensation, _unflatten_dense_tensors(compensation, self.compensation)
        )

    def write_back_stochastic(self, generator: torch.Generator | None) -> None:
        """``w = round_stochastic(w32)``: unbiased, reproducible for a given generator."""
        self.grads32 = None
        rounded = stochastic_round(self.weights32, self.weights[0].dtype, generator)
        torch._foreach_copy_(self.weights, _unflatten_dense_tensors(rounded, self.weights))
