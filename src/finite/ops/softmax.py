"""Softmax and log-softmax along one dimension, correctly rounded in practice, with masks.

Where PyTorch loses digits
--------------------------
``exp(x - m)``, with ``m`` the row maximum, is the textbook stable softmax, but forming
``x - m`` rounds: in float32, ``x = 0.98`` and ``m = 33.58`` give a difference whose
rounding error ``exp`` turns into a relative error of 2**-19 (about 60 ulp) in the
result. The float32 sum adds a few ulp more, and ``log`` of a sum ``1 + rest`` with a
tiny ``rest`` returns 0 instead of ``rest``, so ``torch.log_softmax`` rounds the largest
log-probability of a confident row to 0.

What is done here
-----------------
* float32 input is computed in float64 and float16/bfloat16 input in float32: the
  difference of two input values is exact there (it needs at most 24 + 29 or 8 + 16
  bits), every later step carries more digits than the output keeps, and the result is
  rounded once. float64 input has no wider type: Knuth's TwoSum recovers the rounding
  error ``err`` of ``x - m`` and ``exp(x - m)`` is taken as ``exp(d) * (1 + err)``.
* The log-normaliser is ``log(top) + log1p(rest / top)``: ``top`` counts the entries
  equal to the maximum (their term is exactly ``exp(0) = 1``) and ``rest`` sums the
  others, so ``log_softmax([0, -30])`` is ``[-9.36e-14, -30]``, not ``[0, -30]``.
* float16/bfloat16 softmax runs PyTorch's fused kernel on a float32 copy (its float32
  errors are far below a half-precision ulp); everything else is composed of
  elementwise ops and row sums in the wide dtype.
* Backward uses PyTorch's fused kernels on the saved output.

On CPU the rows are processed in blocks whose wide scratch buffers stay in cache and are
reused, so no full-size temporary is allocated (a fresh 512 MiB buffer costs more in page
faults than the arithmetic done in it).

References
----------
.. [1] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp
   and softmax functions", IMA Journal of Numerical Analysis 41(4), 2021.
.. [2] D. E. Knuth, The Art of Computer Programming, vol. 2, 3rd ed., section 4.2.2
   (TwoSum).
"""

from __future__ import annotations

import math

import torch

from finite._checks import normalize_dim, require_float_tensor

__all__ = ["log_softmax", "softmax"]

# Elements per block of rows on CPU: two float64 scratch buffers of this size (16 MiB in
# all) stay in the shared cache. On CUDA the blocks only bound the scratch memory.
_CPU_BLOCK_ELEMENTS = 1 << 20
_CUDA_BLOCK_ELEMENTS = 1 << 26
_LOG2_E = math.log2(math.e)


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which ``x - max`` is exact: float64 for float32, float32 for
    float16/bfloat16; float64 stays float64 (and is compensated instead)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64


# --------------------------------------------------------------------------------------
# Layout: the softmax dimension last, as a (rows, classes) matrix, processed in blocks
# --------------------------------------------------------------------------------------


def _to_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as (rows, size along ``dim``), ``dim`` moved last; a view when possible."""
    if t.ndim == 0:
        return t.reshape(1, 1)
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def _from_rows(t2: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Undo :func:`_to_rows`; the result is contiguous, like PyTorch's."""
    if len(shape) == 0 or dim == len(shape) - 1:
        return t2.reshape(shape)
    moved = [n for d, n in enumerate(shape) if d != dim] + [shape[dim]]
    return t2.reshape(moved).movedim(-1, dim).contiguous()


def _row_blocks(rows: int, cols: int, device: torch.device) -> list[slice]:
    if torch.compiler.is_compiling():
        step = max(rows, 1)
    else:
        budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _CUDA_BLOCK_ELEMENTS
        step = max(1, budget // max(cols, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


class _Scratch:
    """Reusable (block rows, cols) buffers in the wide dtype, allocated on first use."""

    def __init__(self, like: torch.Tensor, blocks: list[slice]):
        rows = blocks[0].stop - blocks[0].start if blocks else 0
        self.dtype = _wide_dtype(like.dtype)
        self._shape = (rows, like.shape[1])
        self._device = like.device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self._shape, dtype=self.dtype, device=self._device)
        return self._buffers[name][:rows]


# --------------------------------------------------------------------------------------
# The shifted exponentials
# --------------------------------------------------------------------------------------


def _shifted(
    xb: torch.Tensor, m: torch.Tensor, scratch: _Scratch, *, finite_rows_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d = x - m`` in the wide dtype, and for float64 input its rounding error.

    An all -inf row is shifted by 0 (every ``d`` is -inf). ``inf - inf`` (the +inf
    entries of a +inf row) becomes ``d = 0``, so those entries share the row; a NaN row
    becomes 0 too and is made NaN again by its per-row statistics. ``finite_rows_only``
    skips that pass where such rows may give NaN.
    """
    n = xb.shape[0]
    m_safe = torch.where(m == -math.inf, 0, m).to(scratch.dtype)
    d = scratch.get("shifted", n)
    error = None
    if xb.dtype == scratch.dtype:
        torch.sub(xb, m_safe, out=d)
        error = _subtraction_error(xb, m_safe, d, scratch)
    else:
        # A mixed-dtype subtraction is a slow path on CPU; converting first is not.
        d.copy_(xb).sub_(m_safe)
    if not finite_rows_only:
        d.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return d, error


def _subtraction_error(
    x: torch.Tensor, m: torch.Tensor, d: torch.Tensor, scratch: _Scratch
) -> torch.Tensor:
    """TwoSum: the exact ``(x - m) - d`` for ``d = fl(x - m)``, 0 where non-finite."""
    n = x.shape[0]
    b_virtual = torch.sub(d, x, out=scratch.get("twosum", n))
    error = torch.sub(d, b_virtual, out=scratch.get("error", n))
    torch.sub(x, error, out=error)
    error.add_(torch.sub(-m, b_virtual, out=b_virtual))
    return error.nan_to_num_(0.0, 0.0, 0.0)


def _exp(d: torch.Tensor, error: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``exp(d + error)`` into ``out``.

    Wide path (``error`` is None): ``exp2(d * log2(e))``, two to three times faster than
    ``exp`` on CPU. Rounding ``d * log2(e)`` costs a relative error of about
    ``|d| * 2**-53`` (float64) or ``|d| * 2**-24`` (float32, for float16/bfloat16
    input), far below an ulp of the output either way; ``d = 0`` still gives exactly 1.

    float64 input: ``exp(d) * (1 + error)`` with ``|error| <= ulp(d) / 2``; the dropped
    ``error**2 / 2`` is far below an ulp.
    """
    if error is None:
        return torch.mul(d, _LOG2_E, out=out).exp2_()
    torch.exp(d, out=out)
    return out.addcmul_(out, error)


def _log_normaliser(terms: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``log(sum(exp(x - m)))`` per row, float64, from the terms ``exp(x - m)``.

    The terms are at most 1, exactly 1 at the maxima (``exp(0)``), so ``trunc`` counts the
    maxima (``top``) and ``frac`` keeps the rest: ``log(top) + log1p(rest / top)`` keeps
    the digits of a ``rest`` far below 1. Consumes ``terms``. An all -inf row gives
    +inf, a NaN row NaN.
    """
    # Summed in the wide dtype: float64 for float32 input; float32 sums of float16/
    # bfloat16 terms err by a few float32 ulp, 2**-14 of theirs.
    total = terms.sum(dim=-1, keepdim=True).double()
    rest = terms.frac_().sum(dim=-1, keepdim=True).double()
    top = torch.round(total - rest)
    log_norm = torch.log(top) + torch.log1p(rest / top)
    log_norm = torch.where(m == -math.inf, math.inf, log_norm)
    return torch.where(m.isnan(), math.nan, log_norm)


def _store(wide: torch.Tensor, out: torch.Tensor) -> None:
    """Round ``wide`` into ``out`` once (a mixed-dtype arithmetic op writing ``out``
    directly is a slow path on CPU; a plain copy is not)."""
    if wide.data_ptr() != out.data_ptr():
        out.copy_(wide)


# --------------------------------------------------------------------------------------
# Masks and arguments
# --------------------------------------------------------------------------------------


def _check_args(
    x: object, dim: object, mask: object
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    x = require_float_tensor(x, "x")
    dim = normalize_dim(dim, x.ndim)
    if mask is None:
        return x, dim, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = take part), got dtype {mask.dtype}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the shape of x, "
            f"{tuple(x.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    return x, dim, mask


def _apply_mask(x2: torch.Tensor, mask2: torch.Tensor | None) -> torch.Tensor:
    """``x2`` with the entries outside the mask set to -inf (NaN ones included)."""
    return x2 if mask2 is None else x2.masked_fill(~mask2, -math.inf)


# --------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, mask2):
        xm = _apply_mask(x2, mask2)
        out = torch.empty_like(x2)
        blocks = _row_blocks(*xm.shape, xm.device)
        scratch = _Scratch(xm, blocks)
        for block in blocks:
            xb = xm[block]
            m = xb.amax(dim=-1, keepdim=True)
            if xb.dtype in (torch.float16, torch.bfloat16):
                _store(_half_softmax(xb, m, scratch), out[block])
                continue
            d, error = _shifted(xb, m, scratch)
            terms = _exp(d, error, out=d)
            total = terms.sum(dim=-1, keepdim=True)
            if error is not None:
                # float64 input, no wider sum: adding tiny terms to the maxima (each
                # exactly 1) rounds at ulp(1) every time; summing the others apart and
                # adding the count of maxima last rounds once.
                rest = torch.frac(terms, out=scratch.get("rest", xb.shape[0]))
                rest = rest.sum(dim=-1, keepdim=True)
                total = torch.round(total - rest) + rest
            # An all -inf row sums to 0: divide by 1, its softmax is 0 rather than 0/0.
            total = torch.where(m == -math.inf, 1, total)
            total = torch.where(m.isnan(), math.nan, total)
            _store(terms.div_(total), out[block])
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, y, -1, y.dtype), None


def _half_softmax(xb: torch.Tensor, m: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """Softmax of a float16/bfloat16 block in float32 with PyTorch's fused kernel.

    The kernel's float32 errors (a few float32 ulp) are 2**-14 of a bfloat16 ulp, so the
    one rounding to the input dtype is as good as rounding the exact value. Clamping to
    the float32 range changes nothing else: +inf entries become a value above every
    finite half value (they share the row), -inf entries stay at exp(...) = 0, and an
    all -inf row becomes uniform instead of 0/0, then is zeroed by its row factor.
    """
    big = torch.finfo(torch.float32).max
    wide = scratch.get("shifted", xb.shape[0]).copy_(xb).clamp_(-big, big)
    probs = torch.softmax(wide, -1, out=scratch.get("terms", xb.shape[0]))
    return probs.mul_((m != -math.inf).to(probs.dtype))


def softmax(x: torch.Tensor, dim: int, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax along ``dim``, ``exp(x_i) / sum_j exp(x_j)``, with an optional mask.

    A drop-in for :func:`torch.softmax`, accurate to within about half an ulp (correctly
    rounded but for rare ties) where PyTorch's is off by up to ~60 ulp for small
    probabilities, and with masked or all ``-inf`` rows giving zeros instead of NaN.
    float32 input is computed in float64 and float16/bfloat16 input in float32 (with
    PyTorch's fused kernel), where ``x - max`` is exact; float64 input recovers the
    rounding error of ``x - max`` with TwoSum. The result is rounded once.

    Parameters
    ----------
    x : Tensor
        Real floating-point input.
    dim : int
        Dimension along which the softmax is taken.
    mask : Tensor of bool, optional
        Broadcastable to ``x``; ``True`` marks the entries that take part, as a boolean
        ``attn_mask`` of :func:`torch.nn.functional.scaled_dot_product_attention`.
        Entries outside the mask get probability 0 whatever their value (NaN included)
        and zero gradient.

    Returns
    -------
    Tensor
        Same shape and dtype as ``x``. Edge rows:

        * fully masked, or every entry ``-inf``: all zeros, zero gradient;
        * ``k`` entries ``+inf``: ``1/k`` at each of them, 0 elsewhere (the limit when
          ``k = 1``);
        * a NaN that takes part: the whole row is NaN.

        The gradient is PyTorch's ``y * (g - sum(g * y))`` on the saved output.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor, ``dim`` is not an int, or
        ``mask`` is not a bool tensor.
    ValueError
        If ``dim`` is out of range or ``mask`` does not broadcast to ``x``.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import softmax
    >>> x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> softmax(x, dim=-1, mask=torch.tensor([[True, True, False], [False] * 3]))
    tensor([[0.2689, 0.7311, 0.0000],
            [0.0000, 0.0000, 0.0000]])

    References
    ----------
    Blanchard, Higham & Higham (2021), "Accurately computing the log-sum-exp and
    softmax functions".
    """
    x, dim, mask = _check_args(x, dim, mask)
    if x.numel() == 0:
        return x.clone()
    mask2 = None if mask is None else _to_rows(mask.expand(x.shape), dim)
    out2 = _Softmax.apply(_to_rows(x, dim), mask2)
    return _from_rows(out2, x.shape, dim)


# --------------------------------------------------------------------------------------
# log_softmax
# --------------------------------------------------------------------------------------


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, mask2):
        xm = _apply_mask(x2, mask2)
        out = torch.empty_like(x2)
        blocks = _row_blocks(*xm.shape, xm.device)
        scratch = _Scratch(xm, blocks)
        for block in blocks:
            xb = xm[block]
            m = xb.amax(dim=-1, keepdim=True)
            d, error = _shifted(xb, m, scratch)
            terms = _exp(d, error, out=scratch.get("terms", xb.shape[0]))
            log_norm = _log_normaliser(terms, m)
            # d is exact for float32/16 input and the one rounding of d - log_norm is in
            # the wide dtype; float64 input rounds d, but |d - log_norm| >= |d|.
            _store(d.sub_(log_norm.to(d.dtype)), out[block])
        ctx.save_for_backward(out, mask2)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, mask2 = ctx.saved_tensors
        grad_x = torch._log_softmax_backward_data(grad, out, -1, out.dtype)
        if mask2 is not None:
            grad_x = grad_x.masked_fill(~mask2, 0)
        return grad_x, None


def log_softmax(x: torch.Tensor, dim: int, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax along ``dim``, ``x_i - log(sum_j exp(x_j))``, with an optional mask.

    A drop-in for :func:`torch.log_softmax` that keeps the digits of log-probabilities
    near 0: the normaliser is ``max + log(top) + log1p(rest / top)``, ``top`` being the
    number of maxima and ``rest`` the sum of the other ``exp(x_j - max)``. For a
    confident row such as ``[0, -30]`` the result is ``[-9.36e-14, -30]`` where PyTorch
    returns ``[0, -30]``. float32 input is computed in float64 and float16/bfloat16 in
    float32 (PyTorch's CPU kernel rounds its float32 sum to bfloat16); float64 input
    recovers the rounding error of ``x - max`` with TwoSum. Rounded once.

    Parameters
    ----------
    x : Tensor
        Real floating-point input.
    dim : int
        Dimension along which the log-softmax is taken.
    mask : Tensor of bool, optional
        Broadcastable to ``x``; ``True`` marks the entries that take part, as a boolean
        ``attn_mask`` of :func:`torch.nn.functional.scaled_dot_product_attention`.
        Entries outside the mask get ``-inf`` whatever their value (NaN included) and
        zero gradient.

    Returns
    -------
    Tensor
        Same shape and dtype as ``x``. Edge rows:

        * fully masked: all ``-inf``, zero gradient; every entry ``-inf`` (no mask): all
          ``-inf``, and the upstream gradient passes through as for ``x - const``;
        * ``k`` entries ``+inf``: ``-log(k)`` at them, ``-inf`` elsewhere;
        * a NaN that takes part: the whole row is NaN.

        The gradient is PyTorch's ``g - exp(out) * sum(g)`` on the saved output, whose
        softmax term has a relative error of about ``|out| * 2**-24`` (float32).

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor, ``dim`` is not an int, or
        ``mask`` is not a bool tensor.
    ValueError
        If ``dim`` is out of range or ``mask`` does not broadcast to ``x``.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import log_softmax
    >>> log_softmax(torch.tensor([0.0, -30.0]), dim=0)  # torch.log_softmax: [0, -30]
    tensor([-9.3576e-14, -3.0000e+01])
    >>> log_softmax(torch.zeros(2, 2), dim=1, mask=torch.tensor([True, False]))
    tensor([[0., -inf],
            [0., -inf]])

    References
    ----------
    Blanchard, Higham & Higham (2021), "Accurately computing the log-sum-exp and
    softmax functions".
    """
    x, dim, mask = _check_args(x, dim, mask)
    if x.numel() == 0:
        return x.clone()
    mask2 = None if mask is None else _to_rows(mask.expand(x.shape), dim)
    out2 = _LogSoftmax.apply(_to_rows(x, dim), mask2)
    return _from_rows(out2, x.shape, dim)
