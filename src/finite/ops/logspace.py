"""Log-space arithmetic: sums, means and differences of exponentials, kept finite.

Every function here works on ``log`` values and never forms ``exp(x)`` where it could
overflow or underflow on the way to a representable result. float16/bfloat16 inputs are
computed in float32 and rounded once to the input dtype; float64 stays float64.

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

from finite._checks import compute_dtype, normalize_dims, require_float_tensor

__all__ = ["log1mexp", "log1pexp", "logaddexp", "logmeanexp", "logsubexp", "logsumexp"]

_LOG_2 = math.log(2.0)

# On CPU the reductions run over blocks of rows sharing one scratch buffer of about 2**24
# elements (64 MiB of float32), instead of a fresh full-size temporary per step: page
# faults on fresh memory cost more than the arithmetic. Smaller blocks would stay in cache
# but multiply the parallel regions, which stall on a machine whose cores are busy.
_CPU_BLOCK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------
# logsumexp / logmeanexp
# --------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View ``t`` as (kept elements, reduced elements), the reduced dims moved last.

    Returns the 2-d tensor (a view whenever the layout allows) and the permutation used.
    """
    if t.ndim == 0:
        return t.reshape(1, 1), ()
    kept = tuple(d for d in range(t.ndim) if d not in dims)
    perm = kept + dims
    rows = math.prod(t.shape[d] for d in kept)
    cols = math.prod(t.shape[d] for d in dims)
    return t.permute(perm).reshape(rows, cols), perm


def _from_rows(t2: torch.Tensor, like: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """Undo :func:`_as_rows` for a tensor shaped like its 2-d result."""
    if like.ndim == 0:
        return t2.reshape(())
    moved_shape = tuple(like.shape[d] for d in perm)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return t2.reshape(moved_shape).permute(inverse)


def _row_blocks(x2: torch.Tensor) -> list[slice]:
    rows, cols = x2.shape
    if x2.device.type != "cpu" or torch.compiler.is_compiling():
        step = max(rows, 1)
    else:
        step = max(1, _CPU_BLOCK_ELEMENTS // max(cols, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _scratch(x2: torch.Tensor, blocks: list[slice], dtype: torch.dtype) -> torch.Tensor | None:
    """One reusable buffer for the blocks, or None when a single block lets the allocator
    hand out the temporary (on CUDA its caching allocator makes that free)."""
    if len(blocks) <= 1:
        return None
    rows = blocks[0].stop - blocks[0].start
    return torch.empty(rows, x2.shape[1], dtype=dtype, device=x2.device)


def _shifted(xb: torch.Tensor, shift: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """``xb - shift`` in the dtype of ``shift``, written into ``scratch`` if given."""
    if scratch is None:
        return torch.sub(xb, shift)
    out = scratch[: xb.shape[0]]
    if xb.dtype == out.dtype:
        return torch.sub(xb, shift, out=out)
    # A mixed-dtype sub is a slow path on CPU; converting first is not.
    return out.copy_(xb).sub_(shift)


def _split_sums(
    x2: torch.Tensor, w2: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``x2``: the max ``m``, the total weight ``top`` of the entries equal to
    ``m``, and ``rest``, the weighted sum of ``exp(x - m)`` over the other entries.

    The row's sum of exponentials is ``exp(m) * (top + rest)``. Keeping the max apart
    (Blanchard, Higham & Higham) lets ``log1p(rest / top)`` keep the digits of a tiny
    ``rest`` that ``log(1 + rest)`` would round away.
    """
    blocks = _row_blocks(x2)
    scratch = _scratch(x2, blocks, dtype)
    # Two ways to take the maxima out of the sum, both exact. On CPU, max() with indices
    # is a scalar loop, several times slower than amax() plus the two extra (cached) passes
    # of frac(); on GPU those passes cost more than the indices.
    by_index = w2 is None and x2.device.type != "cpu"
    maxima, tops, rests = [], [], []
    for block in blocks:
        xb = x2[block]
        if by_index:
            mb, at_max = xb.max(dim=-1, keepdim=True)
        else:
            if w2 is not None:
                # SciPy's convention: a zero weight removes the entry, even an inf or NaN.
                wb = w2[block]
                xb = xb.masked_fill(wb == 0, -math.inf)
            mb = xb.amax(dim=-1, keepdim=True)
        mb = mb.to(dtype)
        # A non-finite max would make x - m NaN (inf - inf); such rows are settled from m.
        terms = _shifted(xb, torch.where(mb.isfinite(), mb, 0), scratch).exp_()
        # With a finite max, terms <= 1 with equality exactly at the maxima (exp(0) = 1).
        if by_index:
            # Take one maximum out (one element per row); ties stay in rest as 1 each.
            rest = terms.scatter_(-1, at_max, 0).sum(dim=-1, keepdim=True)
            top = torch.ones_like(rest)
        elif w2 is None:
            # frac() sends the maxima to 0; total - rest counts them, up to rounding far
            # below 1/2. A +inf row has total = inf and only needs a positive top.
            total = terms.sum(dim=-1, keepdim=True)
            rest = terms.frac_().sum(dim=-1, keepdim=True)
            top = torch.where(total == math.inf, 1, torch.round(total - rest))
        else:
            # trunc() picks the maxima and frac() the others. In a +inf row, top becomes
            # the ±inf (or NaN) sum of the weights of the +inf entries.
            top = torch.trunc(terms).mul_(wb).sum(dim=-1, keepdim=True)
            rest = terms.frac_().mul_(wb).sum(dim=-1, keepdim=True)
        maxima.append(mb)
        tops.append(top)
        rests.append(rest)
    return torch.cat(maxima), torch.cat(tops), torch.cat(rests)


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
    x2: torch.Tensor,
    m: torch.Tensor,
    total: torch.Tensor,
    lse: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``m + log(total / n)`` per row, ``total = sum(exp(x - m))`` over the n columns.

    Near a tie of all entries, ``total / n`` is close to 1 and ``total - n`` cancels the
    digits that carry the answer; ``sum(expm1(x - m))`` is that difference computed
    directly (exactly 0 when all entries are equal), at the cost of one more pass.
    """
    count = x2.shape[1]
    blocks = _row_blocks(x2)
    scratch = _scratch(x2, blocks, dtype)
    shift = torch.where(m.isfinite(), m, 0)
    excess = torch.cat(
        [
            _shifted(x2[block], shift[block], scratch).expm1_().sum(dim=-1, keepdim=True)
            for block in blocks
        ]
    )
    log_mean = torch.where(total > count / 2, torch.log1p(excess / count), torch.log(total / count))
    # Rows with a non-finite max are settled as for the sum: ±inf or NaN.
    return torch.where(m.isfinite(), m + log_mean, lse)


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, dims, keepdim, mean, return_sign):
        dtype = compute_dtype(x.dtype)
        x2, _ = _as_rows(x, dims)
        rows, cols = x2.shape
        w2 = None
        if weights is not None:
            w2, _ = _as_rows(weights.to(dtype).expand(x.shape), dims)
        if cols == 0:
            lse = torch.full((rows, 1), -math.inf, dtype=dtype, device=x.device)
            sign = torch.zeros_like(lse)
            value = torch.full_like(lse, math.nan) if mean else lse
            shift = scale = torch.zeros_like(lse)
        else:
            m, top, rest = _split_sums(x2, w2, dtype)
            lse, sign = _log_abs_sum(m, top, rest)
            value = _log_mean_exp(x2, m, top + rest, lse, dtype) if mean else lse
            shift, scale = _gradient_factors(m, top, rest, lse)
        if not return_sign:
            value = torch.where(sign < 0, math.nan, value)
            scale = torch.where(sign < 0, math.nan, scale)
        ctx.dims = dims
        ctx.save_for_backward(x, weights, shift, scale)
        out_shape = _reduced_shape(x.shape, dims, keepdim)
        value = value.to(x.dtype).reshape(out_shape)
        sign = sign.to(x.dtype).reshape(out_shape)
        ctx.mark_non_differentiable(sign)
        return value, sign

    @staticmethod
    def backward(ctx, grad_value, grad_sign):
        x, weights, shift, scale = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dtype = shift.dtype
        x2, perm = _as_rows(x, ctx.dims)
        upstream = grad_value.to(dtype).reshape(-1, 1) * scale
        w2 = None
        if weights is not None:
            w2, _ = _as_rows(weights.to(dtype).expand(x.shape), ctx.dims)
        grad_x2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if need_x else None
        grad_w2 = torch.empty(x2.shape, dtype=dtype, device=x.device) if need_w else None
        blocks = _row_blocks(x2)
        # Without weights and in the compute dtype, the gradient buffer is the workspace.
        in_place = w2 is None and x.dtype == dtype
        scratch = None if in_place else _scratch(x2, blocks, dtype)
        for block in blocks:
            workspace = grad_x2[block] if in_place else scratch
            weight = _shifted(x2[block], shift[block], workspace).exp_()
            weight.mul_(upstream[block])
            if w2 is None:
                if not in_place:
                    grad_x2[block] = weight  # the one rounding to float16/bfloat16
                continue
            wb = w2[block]
            if need_w:
                grad_w2[block] = weight
            if need_x:
                grad_x2[block] = torch.where(wb == 0, 0, weight * wb)
        grad_x = _from_rows(grad_x2, x, perm) if need_x else None
        grad_w = None
        if need_w:
            grad_w = _from_rows(grad_w2, x, perm).sum_to_size(weights.shape).to(weights.dtype)
        return grad_x, grad_w, None, None, None, None


def _gradient_factors(
    m: torch.Tensor, top: torch.Tensor, rest: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``shift`` and ``scale`` with ``d lse / d w_i = exp(x_i - shift) * scale``.

    The gradient is ``exp(x_i - m) / (top + rest)``, built from the exact max rather than
    the rounded result (whose rounding, up to |lse| * eps, would enter every weight).
    Forming ``x_i - m`` can itself round, by up to |x_i - m| * eps / 2, which ``exp``
    turns into a relative error of the same size. Where ``exp(-m)`` lies in [tiny, 2],
    the weight is ``exp(x_i) * exp(-m)`` instead: no difference is formed, ``exp(x_i)``
    cannot overflow (x_i <= m), and an ``exp(x_i)`` in the subnormal range is scaled by
    at most 2. Edge rows:

    * +inf result: the derivative is undefined; ``exp(x_i - inf)`` gives NaN at the +inf
      entries and 0 at the others, as in PyTorch.
    * -inf result (all -inf, or weights that cancel): zero gradient; the +inf shift keeps
      ``exp`` at 0.
    * NaN result: NaN gradient.
    """
    unshifted = (m >= -_LOG_2) & (m <= -math.log(torch.finfo(m.dtype).tiny))
    numerator = torch.where(unshifted, torch.exp(-m), 1)
    scale = torch.where(m == math.inf, 1, numerator / (top + rest))
    scale = torch.where(lse == -math.inf, 0, scale)
    scale = torch.where(lse.isnan(), math.nan, scale)
    shift = torch.where(unshifted, 0, torch.where(m.isfinite(), m, math.inf))
    return shift, scale


def _reduced_shape(shape: torch.Size, dims: tuple[int, ...], keepdim: bool) -> tuple[int, ...]:
    if keepdim:
        return tuple(1 if d in dims else n for d, n in enumerate(shape))
    return tuple(n for d, n in enumerate(shape) if d not in dims)


def _check_reduction_args(
    x: object, dim: int | Sequence[int] | None, keepdim: object
) -> tuple[torch.Tensor, tuple[int, ...]]:
    x = require_float_tensor(x, "x")
    if not isinstance(keepdim, bool):
        raise TypeError(f"keepdim must be a bool, got {type(keepdim).__name__}")
    if not (dim is None or isinstance(dim, (int, tuple, list))):
        raise TypeError(f"dim must be an int, a sequence of ints or None, got {type(dim).__name__}")
    if isinstance(dim, (tuple, list)) and len(dim) == 0:
        raise ValueError("dim=() is ambiguous; pass dim=None to reduce over every dimension")
    dims = normalize_dims(dim, x.ndim)
    return x, dims


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
        is inf or NaN. Cast to the compute dtype of ``x``.
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
    Accuracy: within 2 ulp of the exact result unless the max and ``log|top + rest|``
    cancel (a result near 0 from a negative max), where any working-precision method has
    an error of an ulp of ``|m|``. float16/bfloat16 are computed in float32 and rounded
    once: one of the two neighbours of the exact value.

    Gradient: ``d out / d x_i = w_i * exp(x_i - m) / (top + rest)`` (the weighted softmax,
    0 at -inf entries) and ``d out / d w_i = exp(x_i - m) / (top + rest)``, shifted by
    the exact max rather than by the rounded result; within 4 ulp where ``x_i - m`` is
    exact or the max is in ``[-log 2, -log(tiny)]``, and ``(|x_i - m| / 2 + 4)`` ulp
    otherwise (PyTorch adds ``|out|`` ulp to that). Where the result is +inf the gradient
    is NaN at the +inf entries and 0 elsewhere, as in PyTorch: the function has no
    derivative there.

    Speed: about PyTorch's on CPU (one shared scratch buffer instead of fresh temporaries)
    and on CUDA in float32; a CUDA bfloat16/float16 input costs about 2x PyTorch's
    time, which rounds every term to the input dtype instead of keeping float32.

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
    x, dims = _check_reduction_args(x, dim, keepdim)
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
    This costs one more pass over ``x`` than :func:`logsumexp`.

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
    x, dims = _check_reduction_args(x, dim, keepdim)
    return _LogSumExp.apply(x, None, dims, keepdim, True, False)[0]


# --------------------------------------------------------------------------------------
# Two-argument and elementwise functions
# --------------------------------------------------------------------------------------


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    result = torch.result_type(a, b)
    return result, compute_dtype(result)


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
    whose values it matches in the same edge cases. The difference is in the gradient:
    where both arguments are -inf the result is -inf with zero gradients (PyTorch gives
    NaN), where both are +inf each gets 1/2, and the weights ``sigmoid(±(a - b))`` are
    both computed from ``exp(-|a - b|)`` with the rounding error of ``a - b`` fed back
    in, so the smaller one keeps its digits far into the tail (within 4 ulp, where
    forming ``a - b`` alone costs ``|a - b| / 2`` ulp).

    Parameters
    ----------
    a, b : Tensor
        Real floating-point tensors that broadcast together.

    Returns
    -------
    Tensor
        In ``torch.result_type(a, b)``; float16/bfloat16 are computed in float32.

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

    Computed as ``a + log1mexp(b - a)``, so it is as accurate as :func:`log1mexp`.

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


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-x))`` without overflow, accurate in both tails.

    With ``e = exp(-|x|) <= 1``: ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` below,
    so the small tail is a quotient of accurate terms (down to subnormals) rather than
    the rounding residue ``1 - sigmoid(|x|)``.
    """
    small = torch.exp(-x.abs())
    return torch.where(x >= 0, 1, small) / (1 + small)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta):
        xc = x.to(compute_dtype(x.dtype))
        # Exact identity: log(1 + e^t) = max(t, 0) + log1p(exp(-|t|)). Dividing by beta
        # before adding max(x, 0) means beta * x never overflows.
        small = torch.exp(-beta * xc.abs())
        # log1p(e) = e * (1 - e / 2 + ...): below eps / 4 it is e to within 1/8 ulp, and
        # taking e avoids log1p's misrounding of subnormal arguments (Mächler's region
        # x < log(eps): -37.4 in float64, -17.3 in float32).
        tail = torch.where(small < torch.finfo(xc.dtype).eps / 4, small, torch.log1p(small))
        if beta != 1.0:
            tail = tail / beta
        ctx.beta = beta
        ctx.save_for_backward(x)
        return (xc.clamp_min(0) + tail).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xc = x.to(compute_dtype(x.dtype))
        scaled = xc if ctx.beta == 1.0 else ctx.beta * xc
        return (grad.to(xc.dtype) * _sigmoid(scaled)).to(x.dtype), None


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
    return _Softplus.apply(require_float_tensor(x, "x"), 1.0)
