"""Log-space arithmetic: sums, means and differences of exponentials, kept finite.

Every function here works on ``log`` values and never forms ``exp(x)`` where it could
overflow or underflow on the way to a representable result. Each result is rounded once
to the input dtype: float16/bfloat16 inputs are computed in float32, float32 inputs of
the sums and differences (``logsumexp``, ``logmeanexp``, ``logaddexp``, ``logsubexp``)
in float64, where a result near 0 can be the difference of two terms of order 1;
float64 stays float64.

References
----------
.. [1] M. Mächler, "Accurately Computing log(1 - exp(-|a|)) Assessed by the Rmpfr
   package", CRAN vignette, 2012.
.. [2] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp
   and softmax functions", IMA Journal of Numerical Analysis 41(4), 2021.
.. [3] SciPy, ``scipy.special.logsumexp`` (the ``b=`` and ``return_sign=`` arguments).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from finite._checks import compute_dtype, require_float_tensor
from finite.ops._rows import (
    Scratch,
    as_rows,
    check_reduction_args,
    from_rows,
    kept_shape,
    row_blocks,
)
from finite.ops.activations import softplus

__all__ = ["log1mexp", "log1pexp", "logaddexp", "logmeanexp", "logsubexp", "logsumexp"]

_LOG_2 = math.log(2.0)

# On CPU the reductions run over blocks of about 2**24 elements sharing one workspace
# (128 MiB in float64) instead of fresh full-size temporaries, whose page faults cost
# more than the arithmetic. Blocks small enough to stay in cache would multiply the
# parallel regions (about ten per block), which stall badly on a machine whose cores are
# busy. On CUDA the caching allocator makes temporaries free; blocks there only bound the
# memory of a float64 workspace.
_CPU_BLOCK_ELEMENTS = 1 << 24
_CUDA_BLOCK_BYTES = 1 << 30

# The softmax kept for the backward pass of a float32 input is stored times 2**64: its
# entries down to 2**-190 stay normal in float32, so that multiplying one by a large
# incoming gradient (a loss scale) does not enlarge the rounding of a subnormal.
_PROBS_EXPONENT = 64


def _work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the log-space functions compute in: float64 for float32 input.

    A result near 0 can be the difference of two terms of order 1 (``m + log(s)`` with
    ``m ~ -log(s)``), so the terms need more digits than the result: 29 more bits keep a
    float32 result within half an ulp plus ``2**-29`` ulp per unit of the condition
    number, and float64 differences of float32 values are exact, so ``exp(x - m)`` has
    no rounding error in its argument. float16/bfloat16 are computed in float32 (13 or
    16 extra bits); float64 stays float64 (there is no wider type: error-free
    transformations recover the rounding of ``x - m`` where it matters). MPS has no
    float64.
    """
    if dtype == torch.float32 and device.type != "mps":
        return torch.float64
    return compute_dtype(dtype)


# --------------------------------------------------------------------------------------
# logsumexp / logmeanexp
# --------------------------------------------------------------------------------------


def _row_blocks(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> list[slice]:
    """Row slices whose workspace (in ``dtype``) fits one block's budget; at least one,
    so that an input without rows still gives (empty) per-row results."""
    blocks = row_blocks(
        rows,
        cols,
        device,
        cpu_elements=_CPU_BLOCK_ELEMENTS,
        cuda_elements=_CUDA_BLOCK_BYTES // dtype.itemsize,
    )
    return blocks or [slice(0, 0)]


def _scratch(
    blocks: list[slice], cols: int, dtype: torch.dtype, device: torch.device
) -> Scratch | None:
    """Reusable buffers for the blocks, or None when a single block lets the allocator
    hand out the temporaries (on CUDA its caching allocator makes that free)."""
    return Scratch(blocks, cols, dtype, device) if len(blocks) > 1 else None


def _buffer(scratch: Scratch | None, name: str, rows: int) -> torch.Tensor | None:
    return None if scratch is None else scratch.get(name, rows)


def _shifted(xb: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``xb - shift`` in the dtype of ``shift``, written into ``out`` if given."""
    if xb.dtype == shift.dtype or xb.device.type != "cpu":
        # On CUDA a mixed-dtype sub converts in the kernel, without a widened copy of xb.
        return torch.sub(xb, shift) if out is None else torch.sub(xb, shift, out=out)
    # On CPU a mixed-dtype sub is a slow path; converting first is not.
    if out is None:
        out = torch.empty(xb.shape, dtype=shift.dtype, device=xb.device)
    return out.copy_(xb).sub_(shift)


def _difference_error(
    xb: torch.Tensor, shift: torch.Tensor, d: torch.Tensor, scratch: Scratch | None
) -> torch.Tensor:
    """``e`` with ``xb - shift = d + e`` exactly, ``d`` being the rounded difference.

    Knuth's TwoSum of ``xb`` and ``-shift``: it needs no ordering of the two, and both
    orders occur in a row. ``scratch`` (or None) holds the two buffers for the work.
    Where ``d`` is not finite the error is 0.
    """
    rows = xb.shape[0]
    first = _buffer(scratch, "twosum", rows)
    second = _buffer(scratch, "error", rows)
    virtual_b = torch.sub(d, xb, out=first) if first is not None else torch.sub(d, xb)
    error = torch.sub(d, virtual_b, out=second) if second is not None else d - virtual_b
    torch.sub(xb, error, out=error)  # what rounding took from xb ...
    torch.sub(shift.neg(), virtual_b, out=virtual_b)  # ... and from -shift
    return error.add_(virtual_b).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _split_sums(
    x2: torch.Tensor,
    w2: torch.Tensor | None,
    dtype: torch.dtype,
    mean: bool = False,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per row of ``x2``: the max ``m``, the total weight ``top`` of the entries equal to
    ``m``, ``rest``, the weighted sum of ``exp(x - m)`` over the other entries, and with
    ``mean`` (no weights) ``excess = sum(expm1(x - m))`` (else None). Given ``probs``
    (no weights), the softmax ``exp(x - m) / (top + rest)`` times ``2**_PROBS_EXPONENT``
    is written into it, rounded once.

    The row's sum of exponentials is ``exp(m) * (top + rest)``. Keeping the max apart
    (Blanchard, Higham & Higham) lets ``log1p(rest / top)`` keep the digits of a tiny
    ``rest`` that ``log(1 + rest)`` would round away. ``excess`` is ``top + rest - n``
    without the cancellation (see :func:`_log_mean_exp`).
    """
    blocks = _row_blocks(*x2.shape, dtype, x2.device)
    scratch = _scratch(blocks, x2.shape[1], dtype, x2.device)
    # Two ways to take the maxima out of the sum, both exact. On CPU, max() with indices
    # is a scalar loop, several times slower than amax() plus the two extra (cached) passes
    # of frac(); on GPU those passes cost more than the indices.
    by_index = w2 is None and x2.device.type != "cpu"
    maxima, tops, rests, excesses = [], [], [], []
    for block in blocks:
        xb = x2[block]
        second = _buffer(scratch, "second", xb.shape[0]) if mean or probs is not None else None
        if by_index:
            mb, at_max = xb.max(dim=-1, keepdim=True)
        else:
            if w2 is not None:
                # SciPy's convention: a zero weight removes the entry, even an inf or NaN.
                wb = w2[block]
                xb = xb.masked_fill(wb == 0, -math.inf)
            mb = xb.amax(dim=-1, keepdim=True)
        mb = mb.to(dtype)
        # A non-finite max would make x - m NaN (inf - inf). In a +inf row, the largest
        # finite shift keeps exp() at inf for the +inf entries and 0 for the others.
        shift = torch.nan_to_num(mb, nan=0.0, neginf=0.0)  # +inf -> the largest float
        terms = _shifted(xb, shift, _buffer(scratch, "terms", xb.shape[0]))
        if mean:
            excess = torch.expm1(terms) if second is None else torch.expm1(terms, out=second)
            excesses.append(excess.sum(dim=-1, keepdim=True))
        terms = terms.exp_()
        # With a finite max, terms <= 1 with equality exactly at the maxima (exp(0) = 1).
        if by_index:
            # Take one maximum out (one element per row); ties stay in rest as 1 each.
            rest = terms.scatter_(-1, at_max, 0).sum(dim=-1, keepdim=True)
            top = torch.ones_like(rest)
            if probs is not None:
                divisor = _probability_divisor(mb, top + rest)
                torch.div(terms, divisor, out=probs[block])
                # The entry taken out: exp(0) / divisor, NaN at a +inf max, 0 at a -inf max.
                at_max_prob = torch.where(mb == math.inf, math.nan, divisor.reciprocal())
                at_max_prob = torch.where(mb == -math.inf, 0, at_max_prob)
                probs[block].scatter_(-1, at_max, at_max_prob.to(probs.dtype))
        elif w2 is None:
            # frac() sends the maxima to 0; total - rest counts them, up to rounding far
            # below 1/2. A +inf row has total = inf and only needs a positive top.
            total = terms.sum(dim=-1, keepdim=True)
            if probs is None:
                rest = terms.frac_().sum(dim=-1, keepdim=True)
            else:
                fractions = torch.frac(terms) if second is None else torch.frac(terms, out=second)
                rest = fractions.sum(dim=-1, keepdim=True)
                probs[block] = terms.div_(_probability_divisor(mb, total))
            top = torch.where(total == math.inf, 1, torch.round(total - rest))
        else:
            # trunc() picks the maxima and frac() the others. In a +inf row, top becomes
            # the ±inf (or NaN) sum of the weights of the +inf entries.
            top = torch.trunc(terms).mul_(wb).sum(dim=-1, keepdim=True)
            rest = terms.frac_().mul_(wb).sum(dim=-1, keepdim=True)
        maxima.append(mb)
        tops.append(top)
        rests.append(rest)
    excess = torch.cat(excesses) if mean else None
    return torch.cat(maxima), torch.cat(tops), torch.cat(rests), excess


def _probability_divisor(m: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """What ``exp(x - shift)`` is divided by to give the kept softmax, the gradient of
    :func:`logsumexp` times ``2**_PROBS_EXPONENT``: the row's sum over that power of 2,
    except in the rows settled from their max. In a +inf row (terms inf at the +inf
    entries, 0 elsewhere) +inf gives NaN there and 0 elsewhere, as the +inf shift of the
    backward pass would; in a -inf row (terms and total 0) 1 gives zeros; a NaN row NaN."""
    divisor = torch.where(m == math.inf, math.inf, total)
    divisor = torch.where(m == -math.inf, 1, divisor)
    divisor = torch.where(m.isnan(), math.nan, divisor)
    return divisor * 2.0**-_PROBS_EXPONENT


def _log_abs_sum(
    m: torch.Tensor, top: torch.Tensor, rest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log|exp(m) * (top + rest)|`` and the sign of ``top + rest``."""
    ratio = rest / top
    # |1 + r| = 1 + (-2 - r) when r < -1, so log1p still sees the small part.
    log_abs = torch.log(top.abs()) + torch.log1p(torch.where(ratio < -1, -2 - ratio, ratio))
    sign = torch.sign(top) * torch.sign(1 + ratio)
    # The weights at the max cancel: only the rest is left.
    cancelled = top == 0
    log_abs = torch.where(cancelled, torch.log(rest.abs()), log_abs)
    sign = torch.where(cancelled, torch.sign(rest), sign)
    value = m + log_abs
    # +inf max: the sum is +inf * sign(top); NaN when +inf entries of opposite weights meet.
    pos_inf = m == math.inf
    value = torch.where(pos_inf, torch.where(top.isnan(), math.nan, math.inf), value)
    sign = torch.where(pos_inf, torch.sign(top), sign)
    # -inf max: every entry is -inf or weighted by zero, an empty sum.
    neg_inf = m == -math.inf
    value = torch.where(neg_inf, -math.inf, value)
    sign = torch.where(neg_inf, 0, sign)
    sign = torch.where(value.isnan(), math.nan, sign)
    return value, sign


def _log_mean_exp(
    m: torch.Tensor, total: torch.Tensor, excess: torch.Tensor, lse: torch.Tensor, count: int
) -> torch.Tensor:
    """``m + log(total / n)`` per row, ``total = sum(exp(x - m))`` over the n columns.

    Near a tie of all entries, ``total / n`` is close to 1 and ``total - n`` cancels the
    digits that carry the answer; ``excess = sum(expm1(x - m))`` is that difference
    computed directly (exactly 0 when all entries are equal).
    """
    log_mean = torch.where(total > count / 2, torch.log1p(excess / count), torch.log(total / count))
    # Rows with a non-finite max are settled as for the sum: ±inf or NaN.
    return torch.where(m.isfinite(), m + log_mean, lse)


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, dims, keepdim, mean, return_sign):
        dtype = _work_dtype(x.dtype, x.device)
        x2 = as_rows(x, dims)
        rows, cols = x2.shape
        w2 = None
        if weights is not None:
            w2 = as_rows(weights.to(dtype).expand(x.shape), dims)
        # A float32 input computed in float64 keeps its softmax, rounded once to float32,
        # for the backward pass: one float64 exp per element instead of two, and no
        # float64 workspace in the backward pass, for the memory of one more tensor like
        # x (as torch.softmax keeps its output). Elsewhere the backward pass recomputes it.
        keep_probs = w2 is None and dtype != x.dtype == torch.float32 and ctx.needs_input_grad[0]
        probs = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if keep_probs else None
        if cols == 0:
            lse = torch.full((rows, 1), -math.inf, dtype=dtype, device=x.device)
            sign = torch.zeros_like(lse)
            value = torch.full_like(lse, math.nan) if mean else lse
            shift, denominator = torch.zeros_like(lse), torch.full_like(lse, math.inf)
        else:
            m, top, rest, excess = _split_sums(x2, w2, dtype, mean, probs)
            lse, sign = _log_abs_sum(m, top, rest)
            value = _log_mean_exp(m, top + rest, excess, lse, cols) if mean else lse
            shift, denominator = _gradient_factors(m, top, rest, lse)
        if not return_sign:
            value = torch.where(sign < 0, math.nan, value)
            denominator = torch.where(sign < 0, math.nan, denominator)
        ctx.dims = dims
        # The backward pass turns the kept softmax into the gradient in place; a second
        # backward pass (retain_graph=True) recomputes it from x.
        ctx.probs = probs
        ctx.save_for_backward(x, weights, shift, denominator)
        out_shape = kept_shape(x.shape, dims, keepdim)
        value = value.to(x.dtype).reshape(out_shape)
        sign = sign.to(x.dtype).reshape(out_shape)
        ctx.mark_non_differentiable(sign)
        return value, sign

    @staticmethod
    def backward(ctx, grad_value, grad_sign):
        x, weights, shift, denominator = ctx.saved_tensors
        x2 = as_rows(x, ctx.dims)
        probs, ctx.probs = ctx.probs, None
        if probs is not None:
            # probs * 2**-64 * grad in two products, the first rounded once, the second by
            # a power of 2: neither factor is subnormal unless the result underflows.
            grad = grad_value.to(probs.dtype).reshape(-1, 1)
            large = grad.abs() >= 1
            scale = 2.0**-_PROBS_EXPONENT
            probs.mul_(torch.where(large, grad * scale, grad)).mul_(torch.where(large, 1, scale))
            return from_rows(probs, x.shape, ctx.dims), None, None, None, None, None
        need_x, need_w = ctx.needs_input_grad[:2]
        dtype = shift.dtype
        upstream = grad_value.to(dtype).reshape(-1, 1) / denominator
        w2 = None
        if weights is not None:
            w2 = as_rows(weights.to(dtype).expand(x.shape), ctx.dims)
        grad_x2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if need_x else None
        grad_w2 = torch.empty(x2.shape, dtype=dtype, device=x.device) if need_w else None
        blocks = _row_blocks(*x2.shape, dtype, x.device)
        scratch = _scratch(blocks, x2.shape[1], dtype, x.device)
        # In a wider work dtype x - m is exact (to far below the output's ulp); in the
        # input's own dtype its rounding error is fed back in (see _gradient_factors).
        native = x.dtype == dtype
        # Without weights and in the compute dtype, the gradient buffer is the workspace.
        in_place = w2 is None and native
        for block in blocks:
            xb = x2[block]
            out = grad_x2[block] if in_place else _buffer(scratch, "terms", xb.shape[0])
            d = _shifted(xb, shift[block], out)
            error = _difference_error(xb, shift[block], d, scratch) if native else None
            weight = d.exp_()
            if error is not None:
                weight.addcmul_(weight, error)  # exp(d + e) = exp(d) * (1 + e) + O(e**2)
            weight.mul_(upstream[block])
            if w2 is None:
                if not in_place:
                    grad_x2[block] = weight  # the one rounding to the input dtype
                continue
            wb = w2[block]
            if need_w:
                grad_w2[block] = weight
            if need_x:
                grad_x2[block] = torch.where(wb == 0, 0, weight * wb)
        grad_x = from_rows(grad_x2, x.shape, ctx.dims) if need_x else None
        grad_w = None
        if need_w:
            grad_w = from_rows(grad_w2, x.shape, ctx.dims).sum_to_size(weights.shape)
            grad_w = grad_w.to(weights.dtype)
        return grad_x, grad_w, None, None, None, None


def _gradient_factors(
    m: torch.Tensor, top: torch.Tensor, rest: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``shift`` and ``denominator`` with
    ``d lse / d w_i = exp(x_i - shift) / denominator``.

    Used where the backward pass recomputes the exponentials (all but unweighted float32
    input, see _LogSumExp). The gradient is ``exp(x_i - m) / (top + rest)``, built from
    the exact max rather than the rounded result (whose rounding, up to |lse| * eps,
    would enter every weight). In the input's own dtype (float64) ``x_i - m`` can round,
    by up to ``|x_i - m| * eps / 2``, which ``exp`` would turn into a relative error of
    the same size (hundreds of ulps at ``|x_i - m| ~ 700``); the backward pass recovers
    the rounding error ``e`` exactly (TwoSum) and uses ``exp(d) * (1 + e)``. Edge rows:

    * +inf result: the derivative is undefined; ``exp(x_i - inf)`` gives NaN at the +inf
      entries and 0 at the others, as in PyTorch.
    * -inf result (all -inf, or weights that cancel): zero gradient; the +inf shift keeps
      ``exp`` at 0 and the denominator is +inf.
    * NaN result: NaN gradient.
    """
    denominator = torch.where(m == math.inf, 1, top + rest)
    denominator = torch.where(lse == -math.inf, math.inf, denominator)
    denominator = torch.where(lse.isnan(), math.nan, denominator)
    shift = torch.where(m.isfinite(), m, math.inf)
    return shift, denominator


def logsumexp(
    x: torch.Tensor,
    dim: int | Sequence[int] | None,
    keepdim: bool = False,
    *,
    weights: torch.Tensor | None = None,
    return_sign: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log(sum(weights * exp(x)))`` over ``dim``, without overflow or underflow.

    A drop-in for :func:`torch.logsumexp` that adds SciPy's ``b=`` (here ``weights``)
    and ``return_sign``, keeps the digits of a sum dominated by its largest term, and
    defines every edge case, gradients included.

    The row maximum ``m`` is split off: with ``top`` the total weight of the entries equal
    to ``m`` and ``rest = sum(w * exp(x - m))`` over the others, the result is
    ``m + log|top| + log1p(rest / top)``. Unlike ``m + log(sum(exp(x - m)))`` (PyTorch),
    this keeps a tiny ``rest`` (e.g. ``logsumexp([0, -30])`` = 9.4e-14, not 0).

    Parameters
    ----------
    x : Tensor
        Real floating-point input.
    dim : int, sequence of int or None
        Dimension(s) to reduce; ``None`` reduces all of them.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.
    weights : Tensor, optional
        Factors ``b`` in ``log(sum(b * exp(x)))``, broadcastable to ``x``; they may be
        zero or negative. As in SciPy, an entry with zero weight is ignored even when it
        is inf or NaN. Cast to the dtype ``x`` is computed in (float64 for float32).
    return_sign : bool, default False
        Return ``(log|s|, sign(s))`` with the sign in ``{-1, 0, +1}`` (NaN where the
        result is NaN). Without it a negative sum gives NaN, as in SciPy.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        In the dtype of ``x``. Edge cases: a slice whose entries are all -inf (or
        weighted by zero, or empty) gives -inf with sign 0 and a zero gradient; a +inf
        entry gives +inf (NaN when +inf entries of opposite weights meet); NaN propagates.

    Notes
    -----
    Accuracy: float32 input is computed in float64 and rounded once, so the result is
    within half an ulp (plus ``2**-29`` ulp per unit of the condition number
    ``|m| / |result|``), even where the max and ``log|top + rest|`` cancel (a result near
    0 from a max in ``[-log n, 0]``), which costs PyTorch tens of ulps. float16/bfloat16
    are computed in float32: one of the two neighbours of the exact value. float64 is
    within 2 ulp of the exact result except in that cancellation, where the error is up
    to about half an ulp of ``log|top + rest|``: what rounding that logarithm (or any
    ``exp``) to float64 costs by itself, so every float64 method without an
    extended-precision ``exp`` and ``log`` shares it.

    Gradient: ``d out / d x_i = w_i * exp(x_i - m) / (top + rest)`` (the weighted softmax,
    0 at -inf entries) and ``d out / d w_i = exp(x_i - m) / (top + rest)``, shifted by
    the exact max rather than by the rounded result, whose rounding error (``|out|`` ulp)
    PyTorch's gradient carries. float32 without weights: the forward pass keeps the
    softmax, rounded once from float64 (the float64 difference ``x_i - m`` is exact), and
    the backward pass multiplies it by the incoming gradient: within half an ulp, one ulp
    for a subnormal result or an incoming gradient other than a power of 2; with weights,
    within half an ulp (recomputed in float64). float64: within 4 ulp, the rounding error
    of ``x_i - m`` (``|x_i - m| / 2`` ulp, hundreds of ulps at ``|x_i - m| ~ 700``) being
    recovered exactly and fed back in. Where the result is +inf the gradient is NaN at
    the +inf entries and 0 elsewhere, as in PyTorch: the function has no derivative
    there.

    Speed and memory: on CPU the rows are processed in blocks sharing one workspace.
    float32 without weights costs one float64 ``exp`` per element, about PyTorch's time
    (see ``benchmarks/ops.py``), and keeps one more tensor like ``x`` (the softmax) from
    the forward to the backward pass when ``x`` requires a gradient; other inputs
    recompute the exponentials in the backward pass. On CUDA the float64 workspace of a
    float32 input doubles the bytes of the forward pass's temporaries; blocks bound it to
    1 GiB.

    Raises
    ------
    TypeError
        If ``x`` or ``weights`` is not a real floating-point tensor, or ``dim`` or
        ``keepdim`` has the wrong type.
    ValueError
        If ``dim`` is out of range, repeated or ``()``, or ``weights`` does not
        broadcast to the shape of ``x``.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import logsumexp
    >>> logsumexp(torch.tensor([0.0, -30.0]), dim=0)  # torch.logsumexp gives 0.
    tensor(9.3576e-14)
    >>> logsumexp(torch.tensor([1.0, 2.0]), 0, weights=torch.tensor([1.0, -1.0]),
    ...           return_sign=True)
    (tensor(1.5413), tensor(-1.))
    >>> logsumexp(torch.full((3,), -float("inf")), 0)
    tensor(-inf)

    References
    ----------
    Blanchard, Higham & Higham (2021); ``scipy.special.logsumexp``.
    """
    x, dims = check_reduction_args(x, dim, keepdim)
    if weights is not None:
        weights = require_float_tensor(weights, "weights")
        try:
            broadcast = torch.broadcast_shapes(weights.shape, x.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != x.shape:
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} do not broadcast to the shape "
                f"of x, {tuple(x.shape)}"
            )
    if not isinstance(return_sign, bool):
        raise TypeError(f"return_sign must be a bool, got {type(return_sign).__name__}")
    value, sign = _LogSumExp.apply(x, weights, dims, keepdim, False, return_sign)
    return (value, sign) if return_sign else value


def logmeanexp(
    x: torch.Tensor, dim: int | Sequence[int] | None, keepdim: bool = False
) -> torch.Tensor:
    """``log(mean(exp(x)))`` over ``dim``: :func:`logsumexp` minus ``log(n)``, accurately.

    ``n`` is the number of elements reduced. With ``m`` the max and ``S = sum(exp(x - m))``,
    the result is ``m + log(S / n)``; when ``S > n / 2`` (entries close to a tie) it is
    ``m + log1p(sum(expm1(x - m)) / n)``, which keeps the digits that ``S - n`` (and
    ``logsumexp(x) - log(n)``) cancel: a slice of equal values ``c`` gives exactly ``c``.
    This costs one ``expm1`` per element more than :func:`logsumexp`.

    Accuracy and dtypes as for :func:`logsumexp`: float32 is computed in float64 and
    rounded once (within half an ulp, where ``torch.logsumexp(x) - log(n)`` is tens of
    ulps off near 0); float64 is within 2 ulp except where ``m`` and ``log(S / n)``
    cancel (a result near 0 from a max in ``[0, log n]``), where rounding ``log(S / n)``
    to float64 costs up to half an ulp of that logarithm.

    Parameters
    ----------
    x : Tensor
        Real floating-point input.
    dim : int, sequence of int or None
        Dimension(s) to reduce; ``None`` reduces all of them.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.

    Returns
    -------
    Tensor
        In the dtype of ``x``. All -inf slice: -inf with zero gradient; +inf entry:
        +inf; NaN propagates; an empty slice gives NaN, like :func:`torch.mean`.
        The gradient is the softmax of the slice, as for :func:`logsumexp`.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor.
    ValueError
        If ``dim`` is out of range, repeated or ``()``.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import logmeanexp
    >>> logmeanexp(torch.tensor([[1.0, 1.0, 1.0]]), dim=1)
    tensor([1.])
    """
    x, dims = check_reduction_args(x, dim, keepdim)
    return _LogSumExp.apply(x, None, dims, keepdim, True, False)[0]


# --------------------------------------------------------------------------------------
# Two-argument and elementwise functions
# --------------------------------------------------------------------------------------


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The result dtype of ``(a, b)`` and the dtype to compute in (see _work_dtype)."""
    result = torch.result_type(a, b)
    return result, _work_dtype(result, a.device)


def _exact_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, error)`` with ``a - b = d + error`` exactly (Knuth's TwoSum).

    ``exp(a - b)`` from the rounded ``d`` is off by a relative ``|d| * eps / 2``, tens of
    ulps once ``|d| ~ 30``; the gradients below feed the error back in as
    ``exp(d) * (1 + error)``. The error is 0 where ``d`` is not finite.
    """
    d = a - b
    virtual_b = d - a
    error = (a - (d - virtual_b)) - (b + virtual_b)
    return d, torch.nan_to_num(error, nan=0.0, posinf=0.0, neginf=0.0)


class _LogAddExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        result_dtype, dtype = _common_dtype(a, b)
        ac, bc = a.to(dtype), b.to(dtype)
        # Equal arguments (±inf included, where a - b is NaN) are exactly a + log(2).
        neg_gap = torch.where(ac == bc, 0, -(ac - bc).abs())
        out = torch.maximum(ac, bc) + torch.log1p(torch.exp(neg_gap))
        ctx.save_for_backward(a, b)
        return out.to(result_dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        _, dtype = _common_dtype(a, b)
        ac, bc = a.to(dtype), b.to(dtype)
        gap, error = _exact_difference(ac, bc)
        # exp(-|a - b|), with equal arguments (±inf included) giving exactly 1.
        small = torch.exp(torch.where(ac == bc, 0, -gap.abs())) * (1 - gap.sign() * error)
        # d/da = sigmoid(a - b), from exp(-|a - b|) so neither weight is 1 - (the other).
        larger_weight = 1 / (1 + small)
        smaller_weight = small * larger_weight
        both_neg_inf = (ac == -math.inf) & (bc == -math.inf)
        g = torch.where(both_neg_inf, 0, grad.to(dtype))
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = g * torch.where(ac >= bc, larger_weight, smaller_weight)
            grad_a = grad_a.sum_to_size(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = g * torch.where(bc > ac, larger_weight, smaller_weight)
            grad_b = grad_b.sum_to_size(b.shape).to(b.dtype)
        return grad_a, grad_b


def logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))``, elementwise with broadcasting.

    Computed as ``max(a, b) + log1p(exp(-|a - b|))``, like :func:`torch.logaddexp`,
    whose values it matches in the edge cases. float32 is computed in float64 and rounded
    once: within half an ulp, also near 0 (both arguments in ``(-log 2, 0)``), where the
    two terms cancel and the float32 formula is off by up to tens of ulps. float64 is
    within 2 ulp except in that cancellation, where rounding ``log1p(exp(-|a - b|))`` to
    float64 costs up to half an ulp of it, as for any float64 method.

    The gradient differs from PyTorch's: where both arguments are -inf the result is
    -inf with zero gradients (PyTorch gives NaN), where both are +inf each gets 1/2, and
    the weights ``sigmoid(±(a - b))`` are both computed from ``exp(-|a - b|)`` with the
    rounding error of ``a - b`` fed back in, so the smaller one keeps its digits far into
    the tail (within 4 ulp, where forming ``a - b`` alone costs ``|a - b| / 2`` ulp).

    Parameters
    ----------
    a, b : Tensor
        Real floating-point tensors that broadcast together.

    Returns
    -------
    Tensor
        In ``torch.result_type(a, b)``; float16/bfloat16 are computed in float32,
        float32 in float64.

    Raises
    ------
    TypeError
        If ``a`` or ``b`` is not a real floating-point tensor.
    ValueError
        If the shapes do not broadcast.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import logaddexp
    >>> logaddexp(torch.tensor([0.0, -float("inf")]), torch.tensor([0.0, -float("inf")]))
    tensor([0.6931,   -inf])
    """
    a = require_float_tensor(a, "a")
    b = require_float_tensor(b, "b")
    _check_broadcast(a, b)
    return _LogAddExp.apply(a, b)


def _check_broadcast(a: torch.Tensor, b: torch.Tensor) -> None:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"a of shape {tuple(a.shape)} and b of shape {tuple(b.shape)} do not broadcast"
        ) from None


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (NaN above), with Mächler's switch at -log 2.

    Near 0, ``1 - exp(x)`` cancels, so ``-expm1(x)`` forms it exactly; below -log 2,
    ``exp(x) < 1/2`` and ``log1p(-exp(x))`` is the accurate form.
    """
    return torch.where(x > -_LOG_2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """``1 - exp(x)`` from ``expm1``, as +0 (not -0) at ``x = 0``, negative for ``x > 0``."""
    return 0 - torch.expm1(x)


class _Log1mExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _log1mexp(x.to(compute_dtype(x.dtype))).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xc = x.to(compute_dtype(x.dtype))
        # d/dx = -exp(x) / (1 - exp(x)): finite for x < 0, -0 at -inf, -inf at 0.
        slope = -torch.exp(xc) / _one_minus_exp(xc)
        slope = torch.where(xc > 0, math.nan, slope)
        return (grad.to(xc.dtype) * slope).to(x.dtype)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole domain.

    Mächler's algorithm: ``log(-expm1(x))`` for ``x > -log 2`` and ``log1p(-exp(x))``
    below, so neither form suffers cancellation. PyTorch has no equivalent; in float32
    the naive ``log(1 - exp(x))`` returns -inf for ``|x| < 3e-8`` and 0 below
    ``x ≈ -17``, where the exact value is ``-exp(x)``.

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor, ``x <= 0``.

    Returns
    -------
    Tensor
        In the dtype of ``x``: -inf at ``x = 0``, 0 at ``x = -inf``, NaN for ``x > 0``
        (no host sync to raise). The gradient ``-exp(x) / (1 - exp(x))`` is computed as
        ``-exp(x) / -expm1(x)``: finite for every ``x < 0``, -0 at -inf, -inf at 0.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import log1mexp
    >>> log1mexp(torch.tensor([-1e-10, -1.0, -50.0], dtype=torch.float64))
    tensor([-2.3026e+01, -4.5868e-01, -1.9287e-22], dtype=torch.float64)

    References
    ----------
    Mächler (2012), "Accurately Computing log(1 - exp(-|a|))".
    """
    return _Log1mExp.apply(require_float_tensor(x, "x"))


class _LogSubExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        result_dtype, dtype = _common_dtype(a, b)
        ac, bc = a.to(dtype), b.to(dtype)
        out = ac + _log1mexp(bc - ac)
        both_neg_inf = (ac == -math.inf) & (bc == -math.inf)
        ctx.save_for_backward(a, b)
        return torch.where(both_neg_inf, -math.inf, out).to(result_dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        _, dtype = _common_dtype(a, b)
        ac, bc = a.to(dtype), b.to(dtype)
        gap, error = _exact_difference(bc, ac)
        denominator = _one_minus_exp(gap)
        # a < b is outside the domain: NaN gradients like the value.
        g = torch.where(gap > 0, math.nan, grad.to(dtype))
        both_neg_inf = (ac == -math.inf) & (bc == -math.inf)
        g = torch.where(both_neg_inf, 0, g)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            # d/da = 1 / (1 - exp(b - a)); d/db = -exp(b - a) / (1 - exp(b - a)).
            grad_a = torch.where(both_neg_inf, 0, g / denominator)
            grad_a = grad_a.sum_to_size(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            exp_gap = torch.exp(gap) * (1 + error)
            grad_b = torch.where(both_neg_inf, 0, -g * exp_gap / denominator)
            grad_b = grad_b.sum_to_size(b.shape).to(b.dtype)
        return grad_a, grad_b


def logsubexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) - exp(b))`` for ``a >= b``, elementwise with broadcasting.

    Computed as ``a + log1mexp(b - a)``. The two terms cancel where the result is near
    0: ``a`` in ``(0, log 2)`` with ``b`` below it, or ``a`` of any size with ``b`` a tiny
    gap ``g = a - b`` below it and ``a ~ -log(g)`` (float32 ``a = 12.48``, ``g = 4e-6``).
    float32 is therefore computed in float64 and rounded once: within half an ulp
    everywhere. float64 is within 2 ulp except in that cancellation, where rounding
    ``log1mexp(b - a)`` to float64 costs up to half an ulp of it, as for any float64
    method. float16/bfloat16 are computed in float32.

    Parameters
    ----------
    a, b : Tensor
        Real floating-point tensors that broadcast together, ``a >= b``.

    Returns
    -------
    Tensor
        In ``torch.result_type(a, b)``. ``a == b`` gives -inf (both -inf included, with
        zero gradients); ``a = +inf`` with ``b`` finite or -inf gives +inf; ``a < b`` and
        ``a = b = +inf`` give NaN (documented, not raised: raising would need a host
        sync). Gradients ``1 / (1 - exp(b - a))`` and ``-exp(b - a) / (1 - exp(b - a))``
        use ``expm1``, finite wherever ``a > b``.

    Raises
    ------
    TypeError
        If ``a`` or ``b`` is not a real floating-point tensor.
    ValueError
        If the shapes do not broadcast.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import logsubexp
    >>> logsubexp(torch.tensor(0.0, dtype=torch.float64), torch.tensor(-1e-12,
    ...           dtype=torch.float64))
    tensor(-27.6310, dtype=torch.float64)
    """
    a = require_float_tensor(a, "a")
    b = require_float_tensor(b, "b")
    _check_broadcast(a, b)
    return _LogSubExp.apply(a, b)


def log1pexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` (softplus), accurate for every ``x`` in every float dtype.

    Evaluated as the exact identity ``max(x, 0) + log1p(exp(-|x|))``: ``exp`` only sees
    arguments ``<= 0`` (no overflow) and both terms are non-negative (no cancellation),
    so the result is within about 1.5 ulp everywhere. :func:`torch.nn.functional.softplus`
    returns ``x`` above a fixed ``threshold=20``, which drops ``exp(-x) ≈ 2e-9``: a jump
    of ~5e5 ulp in float64.

    Mächler's regions, per dtype (``eps`` of the compute dtype: float32 for
    float16/bfloat16): below ``x = log(eps / 4)`` (-17.3 float32, -37.4 float64) the
    result is ``exp(x)``, since ``log1p(e) = e - e**2 / 2`` is ``e`` to within 1/8 ulp
    there; this is the one switch, and its two sides agree to rounding, so there is no
    visible jump. Above the root
    of ``exp(-x) = x * eps / 2`` (14.0 float32, 33.2 float64; 4.1 bfloat16 and 5.9
    float16 after rounding) the sum rounds to ``x`` by itself: no branch is needed there.

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor.

    Returns
    -------
    Tensor
        In the dtype of ``x``; 0 at -inf, +inf at +inf. The gradient is ``sigmoid(x)``,
        computed without cancellation in either tail.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import log1pexp
    >>> log1pexp(torch.tensor([-100.0, 0.0, 100.0]))
    tensor([3.7835e-44, 6.9315e-01, 1.0000e+02])

    References
    ----------
    Mächler (2012), "Accurately Computing log(1 - exp(-|a|))", section on log1pexp.
    """
    return softplus(x)
