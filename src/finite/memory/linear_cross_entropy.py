"""Cross-entropy of a linear layer's logits without ever holding all the logits.

A language model's head turns ``tokens x hidden`` activations into ``tokens x vocabulary``
logits, usually the largest tensor of the step (8192 tokens x 32768 classes is 1 GiB in
float32, and the backward adds a second one for its gradient). :func:`linear_cross_entropy`
computes the same loss one block of tokens at a time: each block's logits are formed,
reduced to per-row statistics in float32 and turned into that block's share of the
gradients, then dropped.

Per block of rows (``c x V`` logits ``x``, after the optional soft-cap), in float32::

    m    = max_j x_j                        # exp(x - m) <= 1: the sum cannot overflow
    s    = sum_j exp(x_j - m)               # >= 1, no underflow to 0 either
    lse  = m + log(s)
    loss = (1 - eps) (lse - x_t) + eps (lse - mean_j x_j) + z lse**2
    dloss/dx_j = (1 + 2 z lse) p_j - (1 - eps) [j = t] - eps / V,   p_j = exp(x_j - m) / s

and the block's logit gradient ``g`` gives ``g @ W`` (hidden), ``g.T @ h`` (weight, summed
over blocks in float32) and ``sum(g)`` (bias). Per-row values (``m``, ``log s``, the
target's ``x_t - m``) are carried in float64 at O(tokens) cost, as in
:func:`finite.ops.cross_entropy`, and the target entry's gradient uses
``expm1(log p_t)`` so that it keeps its digits when ``p_t`` rounds to 1.

With gradients required and a ``"mean"`` or ``"sum"`` reduction the forward computes the
gradients too (three matrix products per block in all, as for the materialised logits) and
the backward only scales them by the incoming gradient; a second backward through a
retained graph recomputes them. With ``reduction="none"`` the backward recomputes each
block (four matrix products), because every row has its own incoming gradient.

When the vocabulary is large next to the rows (a block spanning it would have few rows,
and sweeping the weight and its gradient once per thin block is slow) or
``vocab_chunk_size`` asks for it, the logits are formed in ``rows x classes`` tiles and an
online log-sum-exp runs across the vocabulary (Milakov & Gimelshein 2018): per row the
running maximum ``m`` and sum ``s`` in float32 (the compute dtype), rescaled by
``exp(m - m') <= 1`` when a tile raises the maximum, the target's logit taken from the
tile that holds it and, for label smoothing, the logits' sum in float64. Only ``m``, ``s``
and ``log p_t`` per row (O(tokens)) are kept for the backward, which recomputes each tile's
logits and sends its gradient into the three products (four products per tile in all).

References
----------
.. [1] M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax",
   arXiv:1805.02867, 2018.
.. [2] E. Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models",
   arXiv:2411.09009, 2024.
.. [3] A. Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways",
   arXiv:2204.02311, 2022 (z-loss).
.. [4] Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
   arXiv:2408.00118, 2024 (logit soft-capping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from finite._checks import compute_dtype, require_choice, require_float_tensor

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
# Default blocks: full-vocabulary row blocks unless the aspect-ratio rule makes them
# thinner than _MIN_ROWS rows; then tiles of _TILE_ROWS rows (or all rows) holding as many
# logits as ``hidden`` has entries, at least _MIN_TILE, and at least _MIN_VOCAB_CHUNK classes.
_MIN_ROWS = 128
_TILE_ROWS = 1024
_MIN_TILE = 1 << 21
_MIN_VOCAB_CHUNK = 512


@dataclass(frozen=True)
class _Options:
    smoothing: float
    z: float
    cap: float | None
    reduction: str
    chunk: int
    vocab_chunk: int


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> torch.Tensor:
    """``finite.ops.cross_entropy(hidden @ weight.T + bias, target, ...)``, in chunks.

    Same loss, options and gradients as the materialised expression, without ever
    holding the ``(tokens, vocabulary)`` logits or their gradient: the extra memory is
    one ``(chunk_size, vocab_chunk_size)`` block in the compute dtype (two with
    ``softcap``; float16/bfloat16 add one in the input dtype and a float32
    weight-gradient accumulator) plus, on full-vocabulary blocks, the gradients of
    ``hidden``, ``weight`` and ``bias`` between forward and backward, or, on vocabulary
    tiles, three numbers per row.

    Parameters
    ----------
    hidden : Tensor
        Activations, shape ``(..., H)``, floating point.
    weight : Tensor
        Output projection, shape ``(V, H)``, same dtype and device as ``hidden``.
    target : Tensor
        Class indices, integer dtype, shape ``hidden.shape[:-1]``, values in ``[0, V)``
        or ``ignore_index``.
    bias : Tensor, optional
        Shape ``(V,)``, same dtype as ``hidden``.
    ignore_index : int, default -100
        Targets equal to it contribute 0 to the loss and the gradients and nothing to
        the ``"mean"`` denominator.
    label_smoothing : float, default 0.0
        In ``[0, 1]``: the target mixed with the uniform distribution, as in PyTorch.
    z_loss : float, default 0.0
        Non-negative coefficient of ``logsumexp(logits)**2`` per non-ignored row.
    softcap : float, optional
        Positive cap: logits become ``softcap * tanh(logits / softcap)`` first.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the number of non-ignored targets.
    chunk_size : int, optional
        Rows per block. Default: the power of two that makes a full-vocabulary block's
        logits about as large as ``hidden`` (at least 1, at most all rows), as PyTorch's
        chunked ``linear_cross_entropy`` does; when that gives fewer than 128 rows (and
        fewer than all), blocks of 1024 rows (or all) over vocabulary tiles instead.
    vocab_chunk_size : int, optional
        Classes per block: below the vocabulary size, the logits are formed in
        ``(chunk_size, vocab_chunk_size)`` tiles with an online log-sum-exp across them
        (one more matrix product per tile than full-vocabulary blocks). Default: the
        whole vocabulary, except when the default ``chunk_size`` would be thinner than
        128 rows; then as many classes as make a tile about the size of ``hidden``
        (at least ``2**21`` logits and 512 classes). With ``chunk_size`` alone given,
        the whole vocabulary; with ``vocab_chunk_size`` alone, ``chunk_size`` defaults
        to the power of two making a tile about the size of ``hidden``.

    Returns
    -------
    Tensor
        In the dtype of ``hidden``; shape ``()`` or, for ``"none"``, ``target``'s shape.
        With ``"mean"`` and every target ignored (or no rows) the loss is 0 with zero
        gradients, as in :func:`finite.ops.cross_entropy`. float16/bfloat16 logits are
        formed by the matrix product in the input dtype (as ``F.linear`` does) and
        reduced in float32; the weight gradient is summed over blocks in float32.

    Raises
    ------
    TypeError
        If a tensor argument has the wrong kind of dtype or an option the wrong type.
    ValueError
        If shapes, dtypes or devices disagree, an option is out of range, or (CPU only) a
        class index lies outside ``[0, V)`` and is not ``ignore_index``.

    Notes
    -----
    The backward is not differentiable again (no double backward).

    Examples
    --------
    >>> import torch
    >>> from finite import ops
    >>> h, w = torch.randn(6, 4), torch.randn(10, 4)
    >>> t = torch.tensor([1, 2, 3, -100, 5, 9])
    >>> loss = linear_cross_entropy(h, w, t, z_loss=1e-4, chunk_size=2)
    >>> torch.allclose(loss, ops.cross_entropy(h @ w.T, t, z_loss=1e-4))
    True
    >>> tiled = linear_cross_entropy(h, w, t, z_loss=1e-4, chunk_size=4, vocab_chunk_size=3)
    >>> torch.allclose(tiled, loss)
    True

    References
    ----------
    Milakov & Gimelshein (2018); Wijmans et al. (2024), Cut Cross-Entropy; Chowdhery et al.
    (2022), PaLM (z-loss); Gemma Team (2024), Gemma 2 (soft-capping).
    """
    hidden = require_float_tensor(hidden, "hidden")
    weight = require_float_tensor(weight, "weight")
    if hidden.ndim == 0:
        raise ValueError("hidden must have at least one dimension (the features)")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[-1]}) for hidden of shape "
            f"{tuple(hidden.shape)}; got {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight has no rows: the vocabulary is empty")
    _same_kind(weight, hidden, "weight")
    if bias is not None:
        bias = require_float_tensor(bias, "bias")
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},); got {tuple(bias.shape)}")
        _same_kind(bias, hidden, "bias")
    _check_target(target, hidden)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    smoothing = _number(label_smoothing, "label_smoothing")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    z = _number(z_loss, "z_loss")
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    cap = None
    if softcap is not None:
        cap = _number(softcap, "softcap")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"softcap must be a positive finite float, got {softcap!r}")
    require_choice(reduction, _REDUCTIONS, "reduction")

    batch_shape = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    rows = h2.shape[0]
    chunk, vocab_chunk = _plan(chunk_size, vocab_chunk_size, rows, hidden.shape[-1], vocab)
    flat_target = target.reshape(-1).long()
    valid = flat_target != ignore_index
    _check_class_range(flat_target, valid, vocab)
    flat_target = torch.where(valid, flat_target, 0)

    options = _Options(smoothing, z, cap, reduction, chunk, vocab_chunk)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss = _LinearCrossEntropy.apply(h2, weight, bias, flat_target, valid, options, wants_grad)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.to(hidden.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Rows of the loss (``"none"``) or their reduction, block by block.

    Saved for backward: the inputs (no copies) and either, when the forward already
    computed them, the gradients of ``hidden``, ``weight`` and ``bias`` for an incoming
    gradient of 1, or (vocabulary tiles) three per-row statistics; never a ``(rows, V)``
    tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, options, wants_grad):
        needs = ctx.needs_input_grad[:3] if wants_grad else (False, False, False)
        tiled = options.vocab_chunk < weight.shape[0]
        precompute = wants_grad and options.reduction != "none" and not tiled
        row_grad = None
        if precompute:
            row_grad = torch.ones(hidden.shape[0], dtype=torch.float64, device=hidden.device)
        if tiled:
            losses, extra = _tiled_losses(hidden, weight, bias, target, valid, options)
        else:
            losses, extra = _chunked(hidden, weight, bias, target, valid, options, row_grad, needs)
        count = valid.sum()
        if options.reduction == "none":
            result = losses
        elif options.reduction == "sum":
            result = losses.sum()
        else:
            # Every row ignored: 0 / 1 = 0, with zero gradients, never 0 / 0.
            result = losses.sum() / count.clamp_min(1)
        ctx.options = options
        ctx.precomputed = precompute
        ctx.tiled = tiled
        ctx.save_for_backward(hidden, weight, bias, target, valid, count, *extra)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, target, valid, count, *extra = ctx.saved_tensors
        options = ctx.options
        needs = ctx.needs_input_grad[:3]
        scale = grad_out.double()
        if options.reduction == "mean":
            scale = scale / count.clamp_min(1)
        if ctx.precomputed:
            # The forward's gradients are for an incoming gradient of 1: scale them in
            # place (their memory becomes the returned gradients). ``.data`` leaves the
            # saved tensors' version counters alone; the flag makes a second backward
            # through a retained graph recompute instead of reading them.
            ctx.precomputed = False
            out = []
            for grad in extra:
                if grad is not None:
                    grad.data.mul_(scale.to(grad.dtype))
                out.append(grad)
            return (*out, None, None, None, None)
        row_grad = scale.expand(hidden.shape[0]) if scale.ndim == 0 else scale
        if ctx.tiled:
            stats = extra
            grads = _tiled_grads(
                hidden, weight, bias, target, valid, options, row_grad, stats, needs
            )
        else:
            _, grads = _chunked(hidden, weight, bias, target, valid, options, row_grad, needs)
        return (*grads, None, None, None, None)


def _logits(h, w, b, x, narrow, mixed_product):
    """``x <- h @ w.T + b`` in the compute dtype, rounded first to the input dtype.

    ``narrow`` is a buffer in the input dtype for float16/bfloat16 (else ``None``): the
    logits are rounded to it as ``F.linear`` rounds them. CUDA forms them in float32
    directly (``mixed_product``).
    """
    if mixed_product:
        torch.mm(h, w.T, out_dtype=x.dtype, out=x)
        if b is not None:
            x.add_(b)
        return x
    product = x if narrow is None else narrow
    if b is None:
        torch.mm(h, w.T, out=product)
    else:
        torch.addmm(b, h, w.T, out=product)
    if narrow is not None:
        x.copy_(product)
    return x


def _view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The first ``rows * cols`` elements of a flat buffer as a contiguous matrix."""
    return buffer[: rows * cols].view(rows, cols)


def _target_in_block(target, block):
    """Column of each row's target inside vocabulary ``block`` (clamped) and whether it is."""
    local = (target - block.start)[:, None]
    inside = (local >= 0) & (local < block.stop - block.start)
    return local.clamp(0, block.stop - block.start - 1), inside


class _Layout(NamedTuple):
    """Sizes and dtypes every chunked pass starts from."""

    rows: int
    vocab: int
    dtype: torch.dtype  # the inputs'
    wide: torch.dtype  # the compute dtype: float32 for float16/bfloat16
    low: bool  # dtype is narrower than wide
    mixed_product: bool  # CUDA forms low-precision products with float32 results directly
    device: torch.device
    chunk: int  # rows per block


def _layout(hidden: torch.Tensor, weight: torch.Tensor, options: _Options) -> _Layout:
    rows, dtype = hidden.shape[0], hidden.dtype
    wide = compute_dtype(dtype)
    low = dtype != wide
    return _Layout(
        rows,
        weight.shape[0],
        dtype,
        wide,
        low,
        low and hidden.is_cuda,
        hidden.device,
        max(1, min(options.chunk, rows)),
    )


def _tiled_losses(hidden, weight, bias, target, valid, options):
    """Per-row losses (float64) over ``(chunk, vocab_chunk)`` tiles of logits.

    An online log-sum-exp walks each block of rows across the vocabulary: the running
    maximum ``m`` and sum ``s`` of ``exp(x - m)`` (compute dtype, float32 for
    float16/bfloat16) are rescaled by ``exp(m - m') <= 1`` when a tile raises the
    maximum; the target's logit is picked from the tile that holds it and, for label
    smoothing, the logits' sum is accumulated in float64. Returns the losses and, for the
    backward, ``(m, s, log p_target)`` per row: O(rows).
    """
    rows, vocab, dtype, wide, low, mixed_product, device, chunk = _layout(hidden, weight, options)
    smoothing, z, cap = options.smoothing, options.z, options.cap
    vocab_blocks = _blocks(vocab, options.vocab_chunk)
    width = vocab_blocks[0].stop
    tile = torch.empty(chunk * width, dtype=wide, device=device)
    narrow = torch.empty(chunk * width, dtype=dtype, device=device) if low else None
    losses = torch.empty(rows, dtype=torch.float64, device=device)
    shifts = torch.empty(rows, dtype=wide, device=device)
    sums = torch.empty(rows, dtype=wide, device=device)
    log_p_target = torch.empty(rows, dtype=torch.float64, device=device)
    for block in _blocks(rows, chunk):
        h, t, c = hidden[block], target[block], block.stop - block.start
        m = torch.full((c, 1), -math.inf, dtype=wide, device=device)
        s = torch.zeros((c, 1), dtype=wide, device=device)
        x_t = torch.zeros((c, 1), dtype=wide, device=device)
        sum_x = torch.zeros(c, dtype=torch.float64, device=device) if smoothing else None
        for vb in vocab_blocks:
            n = vb.stop - vb.start
            b = None if bias is None else bias[vb]
            low_buffer = None if narrow is None else _view(narrow, c, n)
            x = _logits(h, weight[vb], b, _view(tile, c, n), low_buffer, mixed_product)
            if cap is not None:
                torch.tanh(x.div_(cap), out=x).mul_(cap)
            column, inside = _target_in_block(t, vb)
            x_t = torch.where(inside, x.gather(1, column), x_t)
            if sum_x is not None:
                sum_x += x.sum(dim=-1, dtype=torch.float64)
            m_new = torch.maximum(m, x.amax(dim=-1, keepdim=True))
            # Rows with -inf everywhere so far are shifted by 0, not -inf; rows holding
            # +inf or NaN are left to give NaN, as on the materialised path.
            shift = torch.where(torch.isneginf(m_new), 0, m_new)
            # exp(m - m') <= 1; 0 while m = -inf.
            s.mul_(torch.exp(m - shift)).add_(x.sub_(shift).exp_().sum(dim=-1, keepdim=True))
            m = m_new
        shift = torch.where(torch.isneginf(m), 0, m)
        m64, log_s = shift.double().squeeze(-1), torch.log(s.double()).squeeze(-1)
        lse = m64 + log_s
        # log p_t = (x_t - m) - log s: x_t - m is exact in float64.
        log_p_t = (x_t.double().squeeze(-1) - m64) - log_s
        loss = (1 - smoothing) * -log_p_t + z * lse.square()
        if sum_x is not None:
            loss = loss + smoothing * (lse - sum_x / vocab)
        losses[block] = torch.where(valid[block], loss, 0)
        shifts[block], sums[block] = shift.squeeze(-1), s.squeeze(-1)
        log_p_target[block] = log_p_t
    return losses, (shifts, sums, log_p_target)


def _tiled_grads(hidden, weight, bias, target, valid, options, row_grad, stats, needs):
    """Gradients of ``hidden``, ``weight`` and ``bias`` tile by tile (``None`` where not
    needed), from the forward's per-row statistics: each tile's logits are recomputed
    and turned into their gradient, which goes into the three products at once."""
    rows, vocab, dtype, wide, low, mixed_product, device, chunk = _layout(hidden, weight, options)
    features = hidden.shape[1]
    smoothing, z, cap = options.smoothing, options.z, options.cap
    shifts, sums, log_p_target = stats
    vocab_blocks = _blocks(vocab, options.vocab_chunk)
    width = vocab_blocks[0].stop
    tile = torch.empty(chunk * width, dtype=wide, device=device)
    narrow = torch.empty(chunk * width, dtype=dtype, device=device) if low else None
    tanh_buffer = torch.empty_like(tile) if cap is not None else None
    grad_hidden = grad_weight = grad_bias = None
    accumulator = product = None
    if needs[0]:
        grad_hidden = torch.empty_like(hidden)
        if low:
            # Sums over vocabulary tiles in float32, rounded once.
            accumulator = torch.empty(chunk, features, dtype=wide, device=device)
            if not mixed_product:
                product = torch.empty(chunk, features, dtype=dtype, device=device)
    if needs[1]:
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=device)
    if needs[2]:
        grad_bias = torch.zeros(vocab, dtype=wide, device=device)
    for block in _blocks(rows, chunk):
        h, t, c = hidden[block], target[block], block.stop - block.start
        g = torch.where(valid[block], row_grad[block], 0)
        s64 = sums[block].double()
        lse = shifts[block].double() + torch.log(s64)
        log_p_t = log_p_target[block]
        alpha = g * (1 + 2 * z * lse)
        beta = g * (1 - smoothing)
        # At the target alpha p_t - beta = beta (p_t - 1) + (alpha - beta) p_t, with
        # p_t - 1 = expm1(log p_t): exact where p_t rounds to 1.
        at_target = beta * torch.expm1(log_p_t) + (alpha - beta) * torch.exp(log_p_t)
        at_target = at_target[:, None].to(wide)
        coefficient = (alpha / s64)[:, None].to(wide)
        smooth = (g * (smoothing / vocab))[:, None].to(wide) if smoothing else None
        m = shifts[block][:, None]
        # CPU float16/bfloat16: the weight gradient is a float32 product of the unrounded
        # logit gradient, as on the row-block path.
        h_wide = h.to(wide) if grad_weight is not None and low and not mixed_product else None
        if accumulator is not None:
            h_sum = accumulator[:c]
        elif grad_hidden is not None:
            h_sum = grad_hidden[block]
        for index, vb in enumerate(vocab_blocks):
            n = vb.stop - vb.start
            b = None if bias is None else bias[vb]
            low_buffer = None if narrow is None else _view(narrow, c, n)
            x = _logits(h, weight[vb], b, _view(tile, c, n), low_buffer, mixed_product)
            tanh = None
            if cap is not None:
                tanh = torch.tanh(x.div_(cap), out=_view(tanh_buffer, c, n))
                torch.mul(tanh, cap, out=x)
            grad = x.sub_(m).exp_().mul_(coefficient)  # alpha p_j
            column, inside = _target_in_block(t, vb)
            grad.scatter_(1, column, torch.where(inside, at_target, grad.gather(1, column)))
            if smooth is not None:
                grad.sub_(smooth)
            if tanh is not None:
                # d(cap tanh(y / cap)) / dy = 1 - tanh**2.
                grad.mul_(tanh.square_().neg_().add_(1))
            grad_low = grad if narrow is None else low_buffer.copy_(grad)
            w = weight[vb]
            if grad_hidden is not None:
                if mixed_product:
                    if index == 0:
                        torch.mm(grad_low, w, out_dtype=wide, out=h_sum)
                    else:
                        torch.addmm(h_sum, grad_low, w, out_dtype=wide, out=h_sum)
                elif low:
                    partial = torch.mm(grad_low, w, out=product[:c])
                    if index == 0:
                        h_sum.copy_(partial)
                    else:
                        h_sum.add_(partial)
                elif index == 0:
                    torch.mm(grad, w, out=h_sum)
                else:
                    h_sum.addmm_(grad, w)
            if grad_weight is not None:
                if not low:
                    grad_weight[vb].addmm_(grad.T, h)
                elif mixed_product:
                    gw = grad_weight[vb]
                    torch.addmm(gw, grad_low.T, h, out_dtype=wide, out=gw)
                else:
                    grad_weight[vb].addmm_(grad.T, h_wide)
            if grad_bias is not None:
                grad_bias[vb].add_(grad.sum(dim=0))
        if accumulator is not None:
            grad_hidden[block] = h_sum
    if grad_weight is not None:
        grad_weight = grad_weight.to(dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(dtype)
    return grad_hidden, grad_weight, grad_bias


def _blocks(size: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def _chunked(hidden, weight, bias, target, valid, options, row_grad, needs):
    """Per-row losses (float64) and, if ``row_grad`` is given, the input gradients.

    ``row_grad`` is the gradient of each row's loss (float64, (rows,)). Returns
    ``(losses, (grad_hidden, grad_weight, grad_bias))`` with ``None`` where not needed.
    Every block reuses the same buffers, so the allocator sees no churn.
    """
    rows, vocab, dtype, wide, low, mixed_product, device, chunk = _layout(hidden, weight, options)
    tile = torch.empty(chunk, vocab, dtype=wide, device=device)
    narrow = torch.empty(chunk, vocab, dtype=dtype, device=device) if low else None
    tanh = torch.empty_like(tile) if options.cap is not None else None
    losses = torch.empty(rows, dtype=torch.float64, device=device)
    grad_hidden = grad_weight = grad_bias = None
    if row_grad is not None:
        if needs[0]:
            grad_hidden = torch.empty_like(hidden)
        if needs[1]:
            grad_weight = torch.zeros(weight.shape, dtype=wide, device=device)
        if needs[2]:
            grad_bias = torch.zeros(vocab, dtype=wide, device=device)
    for start in range(0, rows, chunk):
        block = slice(start, min(start + chunk, rows))
        c = block.stop - block.start
        h, x = hidden[block], tile[:c]
        if mixed_product:
            torch.mm(h, weight.T, out_dtype=wide, out=x)
            if bias is not None:
                x.add_(bias)
        else:
            product = narrow[:c] if low else x
            if bias is None:
                torch.mm(h, weight.T, out=product)
            else:
                torch.addmm(bias, h, weight.T, out=product)
            if low:
                # The logits rounded to the input dtype, as F.linear gives them.
                x.copy_(product)
        g = None if row_grad is None else row_grad[block]
        t = None if tanh is None else tanh[:c]
        losses[block], grad = _block(x, t, target[block], valid[block], g, vocab, options)
        if grad is None:
            continue
        if low:
            narrow[:c].copy_(grad)
            grad_low = narrow[:c]
        else:
            grad_low = grad
        if grad_hidden is not None:
            torch.mm(grad_low, weight, out=grad_hidden[block])
        if grad_weight is not None:
            if not low:
                grad_weight.addmm_(grad.T, h)
            elif mixed_product:
                torch.addmm(grad_weight, grad_low.T, h, out_dtype=wide, out=grad_weight)
            else:
                # CPU: a float32 product from the unrounded gradient; low-precision
                # products there round their result, and float32 is the accurate choice.
                grad_weight.addmm_(grad.T, h.to(wide))
        if grad_bias is not None:
            grad_bias.add_(grad.sum(dim=0))
    del tile, narrow, tanh
    if grad_weight is not None:
        grad_weight = grad_weight.to(dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(dtype)
    return losses, (grad_hidden, grad_weight, grad_bias)


def _block(logits, tanh, target, valid, row_grad, vocab, options):
    """One block: per-row losses (float64) and, if ``row_grad``, the logits' gradient.

    ``logits`` (c, V) is in the compute dtype and is overwritten by the gradient;
    ``tanh`` is a buffer of the same shape when there is a soft-cap.
    """
    smoothing, z, cap = options.smoothing, options.z, options.cap
    if cap is not None:
        torch.tanh(logits.div_(cap), out=tanh)
        torch.mul(tanh, cap, out=logits)
    m = logits.amax(dim=-1, keepdim=True)
    # A row with -inf everywhere would give (-inf) - (-inf); shift it by 0 instead. Rows
    # holding +inf or NaN are left to give NaN.
    m = torch.where(torch.isneginf(m), 0, m)
    x_t = logits.gather(1, target[:, None])
    if smoothing:
        mean_x = logits.sum(dim=-1, dtype=torch.float64) / vocab
    exp = logits.sub_(m).exp_()  # exp(x - m) <= 1
    s = exp.sum(dim=-1, keepdim=True)
    log_s = torch.log(s.double()).squeeze(-1)
    m64 = m.double().squeeze(-1)
    lse = m64 + log_s
    # log p_t = (x_t - m) - log s: x_t - m is exact in float64.
    log_p_t = (x_t.double().squeeze(-1) - m64) - log_s
    loss = (1 - smoothing) * -log_p_t + z * lse.square()
    if smoothing:
        loss = loss + smoothing * (lse - mean_x)
    loss = torch.where(valid, loss, 0)
    if row_grad is None:
        return loss, None
    g = torch.where(valid, row_grad, 0)
    alpha = g * (1 + 2 * z * lse)
    beta = g * (1 - smoothing)
    # At the target alpha p_t - beta = beta (p_t - 1) + (alpha - beta) p_t, with
    # p_t - 1 = expm1(log p_t): exact where p_t rounds to 1.
    at_target = beta * torch.expm1(log_p_t) + (alpha - beta) * torch.exp(log_p_t)
    grad = exp.mul_((alpha[:, None] / s.double()).to(exp.dtype))
    grad.scatter_(1, target[:, None], at_target[:, None].to(grad.dtype))
    if smoothing:
        grad.sub_((g * (smoothing / vocab))[:, None].to(grad.dtype))
    if cap is not None:
        # d(cap tanh(y / cap)) / dy = 1 - tanh**2.
        grad.mul_(tanh.square_().neg_().add_(1))
    return loss, grad


def _plan(
    chunk_size: object, vocab_chunk_size: object, rows: int, features: int, vocab: int
) -> tuple[int, int]:
    """Rows and vocabulary entries per block: ``(chunk, vocab_chunk)``."""
    chunk = _positive_int(chunk_size, "chunk_size")
    vocab_chunk = _positive_int(vocab_chunk_size, "vocab_chunk_size")
    # PyTorch's "aspect ratio" rule: a block about as large as ``hidden``.
    budget = max(rows * features, 1)
    if vocab_chunk is None:
        if chunk is not None:
            return chunk, vocab
        chunk = _power_of_two(math.ceil(rows / math.ceil(vocab / max(features, 1))), rows)
        if chunk >= min(rows, _MIN_ROWS):
            return chunk, vocab
        # Full-vocabulary blocks this thin run slowly (the weight and its gradient are
        # swept once per block): tile the vocabulary instead, under the same budget
        # (at least _MIN_TILE logits).
        chunk = min(rows, _TILE_ROWS)
        return chunk, min(vocab, max(_MIN_VOCAB_CHUNK, max(budget, _MIN_TILE) // chunk))
    if chunk is None:
        chunk = _power_of_two(budget // min(vocab_chunk, vocab), rows)
    return chunk, min(vocab_chunk, vocab)


def _power_of_two(target: int, rows: int) -> int:
    """The power of two at or above ``target``, within ``[1, rows]``."""
    target = max(1, target)
    return max(1, min(rows, 1 << (target - 1).bit_length()))


def _positive_int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _same_kind(t: torch.Tensor, hidden: torch.Tensor, name: str) -> None:
    if t.dtype != hidden.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}")
    if t.device != hidden.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def _check_target(target: object, hidden: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype == torch.bool or target.dtype.is_floating_point or target.dtype.is_complex:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
            f"dimension); got {tuple(target.shape)}"
        )
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")


def _check_class_range(target: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    # Reading back is free on CPU; on CUDA the gather asserts instead, as in PyTorch.
    if target.device.type != "cpu" or torch.compiler.is_compiling() or target.numel() == 0:
        return
    outside = valid & ((target < 0) | (target >= vocab))
    if outside.any():
        bad = target[outside][0].item()
        raise ValueError(
            f"target holds class index {bad}, outside [0, {vocab}) and not ignore_index"
        )


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)
