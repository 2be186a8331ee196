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

import torch
from torch.autograd.function import once_differentiable

from finite._checks import compute_dtype, require_choice, require_float_tensor

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class _Options:
    smoothing: float
    z: float
    cap: float | None
    reduction: str
    chunk: int


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
) -> torch.Tensor:
    """``finite.ops.cross_entropy(hidden @ weight.T + bias, target, ...)``, in chunks.

    Same loss, options and gradients as the materialised expression, without ever
    holding the ``(tokens, vocabulary)`` logits or their gradient: the extra memory is
    one ``(chunk_size, vocabulary)`` block in the compute dtype (two with ``softcap``;
    float16/bfloat16 add one in the input dtype and a float32 weight-gradient
    accumulator) plus, between forward and backward, the gradients of ``hidden``,
    ``weight`` and ``bias``.

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
        Rows per block. Default: the power of two that makes a block's logits about as
        large as ``hidden`` (at least 1, at most all rows), as PyTorch's chunked
        ``linear_cross_entropy`` does.

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
    chunk = _chunk_rows(chunk_size, rows, hidden.shape[-1], vocab)
    flat_target = target.reshape(-1).long()
    valid = flat_target != ignore_index
    _check_class_range(flat_target, valid, vocab)
    flat_target = torch.where(valid, flat_target, 0)

    options = _Options(smoothing, z, cap, reduction, chunk)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss = _LinearCrossEntropy.apply(h2, weight, bias, flat_target, valid, options, wants_grad)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.to(hidden.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Rows of the loss (``"none"``) or their reduction, chunk by chunk.

    Saved for backward: the inputs (no copies) and, when the forward already computed
    them, the gradients of ``hidden``, ``weight`` and ``bias`` for an incoming gradient
    of 1; never a ``(rows, V)`` tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, options, wants_grad):
        needs = ctx.needs_input_grad[:3] if wants_grad else (False, False, False)
        precompute = wants_grad and options.reduction != "none"
        row_grad = None
        if precompute:
            row_grad = torch.ones(hidden.shape[0], dtype=torch.float64, device=hidden.device)
        losses, grads = _chunked(hidden, weight, bias, target, valid, options, row_grad, needs)
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
        ctx.save_for_backward(hidden, weight, bias, target, valid, count, *grads)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, target, valid, count, *grads = ctx.saved_tensors
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
            for grad in grads:
                if grad is not None:
                    grad.data.mul_(scale.to(grad.dtype))
                out.append(grad)
            return (*out, None, None, None, None)
        row_grad = scale.expand(hidden.shape[0]) if scale.ndim == 0 else scale
        _, grads = _chunked(hidden, weight, bias, target, valid, options, row_grad, needs)
        return (*grads, None, None, None, None)


def _chunked(hidden, weight, bias, target, valid, options, row_grad, needs):
    """Per-row losses (float64) and, if ``row_grad`` is given, the input gradients.

    ``row_grad`` is the gradient of each row's loss (float64, (rows,)). Returns
    ``(losses, (grad_hidden, grad_weight, grad_bias))`` with ``None`` where not needed.
    Every block reuses the same buffers, so the allocator sees no churn.
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = hidden.dtype
    wide = compute_dtype(dtype)
    low = dtype != wide
    # CUDA forms low-precision products with float32 results directly.
    mixed_product = low and hidden.is_cuda
    device = hidden.device
    chunk = max(1, min(options.chunk, rows))
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


def _chunk_rows(chunk_size: object, rows: int, features: int, vocab: int) -> int:
    if chunk_size is None:
        # PyTorch's "aspect_ratio" rule: a block's logits about the size of ``hidden``.
        target = max(1, math.ceil(rows / math.ceil(vocab / max(features, 1))))
        return max(1, min(rows, 1 << (target - 1).bit_length()))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


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
