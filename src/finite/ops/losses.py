"""Classification losses computed from logits, never from rounded probabilities.

:func:`cross_entropy` never forms the log-probabilities: its forward keeps per-row
statistics (the maximum, an exact shift and ``log1p`` of the sum of the other terms) and
its backward recomputes ``softmax - onehot`` from the logits block by block. That saves
the two full-size temporaries PyTorch's ``log_softmax`` + ``nll_loss`` keep, and lets the
target entry's gradient ``-(1 - p_t)`` come from ``expm1`` instead of ``p_t - 1``, which
rounds to 0 once ``p_t`` rounds to 1.

References
----------
.. [1] A. Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways",
   arXiv:2204.02311, 2022 (z-loss, section 5).
.. [2] Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
   arXiv:2408.00118, 2024 (logit soft-capping).
.. [3] C. Szegedy et al., "Rethinking the Inception Architecture for Computer Vision",
   CVPR 2016 (label smoothing).
"""

from __future__ import annotations

import math

import torch

from finite._checks import compute_dtype, require_choice, require_float_tensor
from finite.ops.activations import softcap as _softcap
from finite.ops.softmax import (
    _exp,
    _log_normaliser,
    _row_blocks,
    _Scratch,
    _shifted,
    _to_rows,
    _wide_dtype,
)

__all__ = ["binary_cross_entropy_with_logits", "cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    """Per-row losses (float64) of class-index or probability targets.

    Inputs: ``logits`` (R, C); ``target`` (R,) int64 class indices with ignored rows
    already replaced by 0, and ``valid`` (R,) bool; or ``probs`` (R, C). ``weight`` is
    (C,) float64 or None. Per-row quantities are float64: they cost O(R) and keep
    ``max - x_t`` and ``lse**2`` exact to the last bit of the input.

    Saved for backward: the logits and, per row, the maximum ``m`` and
    ``log_norm = lse - m``; never the (R, C) log-probabilities.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, probs, weight, smoothing, z):
        cols = logits.shape[1]
        m, log_norm = _row_statistics(logits)
        m64 = m.double().squeeze(-1)
        log_norm64 = log_norm.squeeze(-1)
        lse = m64 + log_norm64
        if probs is None:
            x_t = logits.gather(1, target[:, None]).double().squeeze(-1)
            w_t = _target_weight(weight, target, valid)
            # log p_t = x_t - lse = (x_t - m) - log_norm; x_t - m is exact in float64.
            log_p_t = (x_t - m64) - log_norm64
            loss = w_t * (-(1 - smoothing) * log_p_t + z * lse.square())
            if smoothing:
                loss = loss + smoothing / cols * _sum_of_neg_log_probs(
                    logits, weight, m64, log_norm64
                )
            loss = torch.where(valid, loss, 0)
            # The row's weight in the gradient's softmax term, before smoothing and z.
            row_weight = w_t
        else:
            mix = _smoothed_weighted_targets(probs, weight, smoothing, cols)
            # -sum(mix * log p) = sum(mix) * (lse - m) + sum(mix * (m - x)).
            mass, spread = _target_sums(logits, mix, m64)
            loss = mass * log_norm64 + spread + z * lse.square()
            log_p_t, row_weight = None, mass
        ctx.save_for_backward(
            logits, target, valid, probs, weight, m, log_norm, log_p_t, row_weight
        )
        ctx.smoothing, ctx.z = smoothing, z
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, valid, probs, weight, m, log_norm, log_p_t, row_weight = ctx.saved_tensors
        smoothing, z = ctx.smoothing, ctx.z
        rows, cols = logits.shape
        g = grad_loss.double()
        lse = m.double().squeeze(-1) + log_norm.squeeze(-1)
        if probs is None:
            g = torch.where(valid, g, 0)
            total_weight = cols if weight is None else weight.sum()
            # d loss / d x_j = alpha p_j - beta [j = t] - gamma w_j.
            alpha = g * (
                row_weight * ((1 - smoothing) + 2 * z * lse) + smoothing / cols * total_weight
            )
            beta = g * row_weight * (1 - smoothing)
            gamma = g * (smoothing / cols)
            # At the target, alpha p_t - beta = beta (p_t - 1) + (alpha - beta) p_t with
            # p_t - 1 = expm1(log p_t): exact where p_t rounds to 1.
            at_target = beta * torch.expm1(log_p_t) + (alpha - beta) * torch.exp(log_p_t)
            at_target = torch.where(valid, at_target, 0)
        else:
            # d loss / d x_j = (sum(mix) + 2 z lse) p_j - mix_j.
            alpha = g * (row_weight + 2 * z * lse)
        # p_j = exp(x_j - m) * exp(-log_norm): one more rounding, in the wide dtype.
        coefficient = (alpha[:, None] * torch.exp(-log_norm)).to(_wide_dtype(logits.dtype))
        grad_logits = torch.empty_like(logits)
        blocks = _row_blocks(rows, cols, logits.device)
        scratch = _Scratch(logits, blocks)
        for block in blocks:
            d, error = _shifted(logits[block], m[block], scratch, finite_rows_only=True)
            terms = _exp(d, error, out=d).mul_(coefficient[block])
            if probs is None:
                terms.scatter_(-1, target[block, None], at_target[block, None].to(d.dtype))
                if smoothing:
                    w = 1 if weight is None else weight.to(d.dtype)
                    terms.sub_(gamma[block, None].to(d.dtype) * w)
            else:
                mix = _smoothed_weighted_targets(probs[block], weight, smoothing, cols)
                terms.sub_((mix * g[block, None]).to(d.dtype))
            grad_logits[block] = terms
        grad_probs = None
        if ctx.needs_input_grad[3]:
            # d loss / d q_c = (1 - eps) w_c (lse - x_c).
            factor = g[:, None] * (1 - smoothing)
            if weight is not None:
                factor = factor * weight
            grad_probs = (factor * (lse[:, None] - logits.double())).to(probs.dtype)
        return grad_logits, None, None, grad_probs, None, None, None


def _row_statistics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the maximum (logits' dtype) and ``lse - max`` (float64), as (R, 1)."""
    blocks = _row_blocks(*logits.shape, logits.device)
    scratch = _Scratch(logits, blocks)
    maxima, log_norms = [], []
    for block in blocks:
        xb = logits[block]
        m = xb.amax(dim=-1, keepdim=True)
        # Rows with a +inf or NaN logit are left to give NaN, as in PyTorch.
        d, error = _shifted(xb, m, scratch, finite_rows_only=True)
        maxima.append(m)
        log_norms.append(_log_normaliser(_exp(d, error, out=d), m))
    return torch.cat(maxima), torch.cat(log_norms)


def _target_weight(
    weight: torch.Tensor | None, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    w = torch.ones(target.shape, dtype=torch.float64, device=target.device)
    if weight is not None:
        w = weight[target]
    return torch.where(valid, w, 0)


def _sum_of_neg_log_probs(
    logits: torch.Tensor,
    weight: torch.Tensor | None,
    m: torch.Tensor,
    log_norm: torch.Tensor,
) -> torch.Tensor:
    """``-sum_c w_c log p_c = W (lse - m) + sum_c w_c (m - x_c)`` per row, in float64.

    Both parts are non-negative for non-negative weights, so nothing cancels; the
    float64 products of float32 logits are exact.
    """
    dots = []
    for block in _row_blocks(*logits.shape, logits.device):
        xb = logits[block].double()
        dots.append(xb.sum(dim=-1) if weight is None else xb @ weight)
    dot = torch.cat(dots)
    total_weight = logits.shape[1] if weight is None else weight.sum()
    return total_weight * (log_norm + m) - dot


def _smoothed_weighted_targets(
    probs: torch.Tensor, weight: torch.Tensor | None, smoothing: float, cols: int
) -> torch.Tensor:
    """``w_c * ((1 - eps) q_c + eps / C)`` in float64, PyTorch's smoothed soft target."""
    mix = probs.double()
    if smoothing:
        mix = mix * (1 - smoothing) + smoothing / cols
    return mix if weight is None else mix * weight


def _target_sums(
    logits: torch.Tensor, mix: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``sum(mix)`` and ``sum(mix * (m - x))`` in float64."""
    masses, spreads = [], []
    for block in _row_blocks(*logits.shape, logits.device):
        mb = mix[block]
        gap = m[block, None] - logits[block].double()
        # A zero target weight on a -inf logit contributes 0, not 0 * inf.
        masses.append(mb.sum(dim=-1))
        spreads.append(torch.where(mb == 0, 0, mb * gap).sum(dim=-1))
    return torch.cat(masses), torch.cat(spreads)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy between ``logits`` and class indices or class probabilities.

    Same shapes and semantics as :func:`torch.nn.functional.cross_entropy`, computed
    without forming the log-probabilities (less memory, and the target's gradient keeps
    its digits when ``p_t`` is close to 1), plus PaLM's z-loss and Gemma 2's logit
    soft-capping. Per row, with ``lse = logsumexp(logits)``::

        loss = w_t * ((1 - eps) * (lse - x_t) + z_loss * lse**2)
               + eps / C * sum_c w_c * (lse - x_c)           # class-index targets
        loss = sum_c w_c q'_c (lse - x_c) + z_loss * lse**2  # probability targets,
                                                             # q' = (1 - eps) q + eps / C

    Parameters
    ----------
    logits : Tensor
        Unnormalised scores, shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``.
    target : Tensor
        Either class indices (integer dtype), shape ``()``, ``(N,)`` or
        ``(N, d1, ...)``, values in ``[0, C)`` or ``ignore_index``; or class
        probabilities (floating dtype), the shape of ``logits``.
    ignore_index : int, default -100
        Class-index targets equal to it contribute 0 to the loss and to the gradient,
        and nothing to the ``"mean"`` denominator.
    label_smoothing : float, default 0.0
        In ``[0, 1]``: the target is mixed with the uniform distribution, as in PyTorch.
    z_loss : float, default 0.0
        Non-negative coefficient of ``lse**2`` per (non-ignored) row, which keeps the
        softmax normaliser near 1. With class weights it is scaled by ``w_t`` like the
        rest of the row's loss, so the ``"mean"`` stays ``sum(rows) / sum(w_t)``.
    softcap : float, optional
        Positive cap: logits are replaced by ``softcap * tanh(logits / softcap)`` first.
    weight : Tensor, optional
        Per-class weights, shape ``(C,)``, floating point; not differentiated.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides the sum by the total weight of the non-ignored targets (the
        number of rows for probability targets), as PyTorch does.

    Returns
    -------
    Tensor
        The loss in the dtype of ``logits`` (float16/bfloat16 are computed in float32
        with float64 row statistics and rounded once); shape ``()`` or, for
        ``reduction="none"``, the batch shape. Deviation from PyTorch: with ``"mean"``
        and every target ignored (or a zero total weight, or an empty batch) the loss is
        0 with zero gradients, where PyTorch returns NaN.

    Raises
    ------
    TypeError
        If ``logits`` or ``weight`` is not a real floating-point tensor, or ``target``
        is bool or complex.
    ValueError
        If shapes do not match, an option is out of range, or (CPU only, where checking
        costs no device synchronisation) a class index is outside ``[0, C)`` and not
        ``ignore_index``. On CUDA an out-of-range index triggers a device-side assert,
        as in PyTorch.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import cross_entropy
    >>> logits = torch.tensor([[20.0, 0.0], [0.0, 0.0]])
    >>> cross_entropy(logits, torch.tensor([0, -100]))  # torch: 0 (p_t rounds to 1)
    tensor(2.0612e-09)
    >>> cross_entropy(logits, torch.tensor([-100, -100]))  # torch: nan
    tensor(0.)

    References
    ----------
    Chowdhery et al. (2022), PaLM (z-loss); Gemma Team (2024), Gemma 2 (soft-capping);
    Szegedy et al. (2016) (label smoothing).
    """
    logits = require_float_tensor(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one dimension (the classes), got a 0-d tensor")
    class_dim = 0 if logits.ndim == 1 else 1
    cols = logits.shape[class_dim]
    if cols == 0:
        raise ValueError("logits has no classes (size 0 along the class dimension)")
    batch_shape = logits.shape[:class_dim] + logits.shape[class_dim + 1 :]
    probability_targets = _check_target(target, logits, batch_shape)
    _check_ignore_index(ignore_index)
    smoothing = _fraction(label_smoothing, "label_smoothing")
    z = _non_negative(z_loss, "z_loss")
    weight = _check_weight(weight, cols, logits)
    require_choice(reduction, _REDUCTIONS, "reduction")
    if softcap is not None:
        logits = _softcap(logits, _positive(softcap, "softcap"))

    logits2 = _to_rows(logits, class_dim)
    rows = logits2.shape[0]
    if probability_targets:
        probs2, target2, valid = _to_rows(target, class_dim), None, None
        denominator = torch.tensor(float(rows), dtype=torch.float64, device=logits.device)
    else:
        target2 = target.reshape(-1).long()
        valid = target2 != ignore_index
        _check_class_range(target2, valid, cols)
        target2 = torch.where(valid, target2, 0)
        probs2 = None
        denominator = _target_weight(weight, target2, valid).sum()
    if rows == 0:
        losses = logits2.sum(dim=-1, dtype=torch.float64) * 0
    else:
        losses = _CrossEntropy.apply(logits2, target2, valid, probs2, weight, smoothing, z)

    if reduction == "none":
        return losses.reshape(batch_shape).to(logits.dtype)
    total = losses.sum()
    if reduction == "sum":
        return total.to(logits.dtype)
    # All targets ignored (or zero total weight): the sum is 0; dividing by 1 keeps it 0
    # with a zero gradient instead of PyTorch's 0 / 0.
    return (total / torch.where(denominator == 0, 1, denominator)).to(logits.dtype)


def _check_target(target: object, logits: torch.Tensor, batch_shape: torch.Size) -> bool:
    """Validate ``target``; return True for probability targets."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype == torch.bool or target.dtype.is_complex:
        raise TypeError(
            f"target must hold integer class indices or real class probabilities, "
            f"got dtype {target.dtype}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    if target.dtype.is_floating_point:
        if target.shape != logits.shape:
            raise ValueError(
                f"probability target (floating dtype) must have the shape of logits, "
                f"{tuple(logits.shape)}; got {tuple(target.shape)}"
            )
        return True
    if target.shape != batch_shape:
        raise ValueError(
            f"class-index target must have shape {tuple(batch_shape)} for logits of shape "
            f"{tuple(logits.shape)}; got {tuple(target.shape)}"
        )
    return False


def _check_class_range(target: torch.Tensor, valid: torch.Tensor, cols: int) -> None:
    # On CPU reading the result back is free (no device to wait for); on CUDA the
    # gather in the forward asserts instead, as PyTorch's kernel does.
    if target.device.type != "cpu" or torch.compiler.is_compiling() or target.numel() == 0:
        return
    outside = valid & ((target < 0) | (target >= cols))
    if outside.any():
        bad = target[outside][0].item()
        raise ValueError(
            f"target holds class index {bad}, outside [0, {cols}) and not ignore_index"
        )


def _check_ignore_index(ignore_index: object) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _fraction(value: object, name: str) -> float:
    value = _number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _non_negative(value: object, name: str) -> float:
    value = _number(value, name)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return value


def _positive(value: object, name: str) -> float:
    value = _number(value, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return value


def _check_weight(weight: object, cols: int, logits: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = require_float_tensor(weight, "weight")
    if weight.shape != (cols,):
        raise ValueError(
            f"weight must have shape ({cols},), one entry per class; got {tuple(weight.shape)}"
        )
    if weight.device != logits.device:
        raise ValueError(f"weight is on {weight.device} but logits is on {logits.device}")
    return weight.detach().double()


# --------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# --------------------------------------------------------------------------------------


class _BinaryCrossEntropyWithLogits(torch.autograd.Function):
    """Elementwise ``pw * y * softplus(-x) + (1 - y) * softplus(x)`` in the compute dtype.

    ``softplus(±x) = max(±x, 0) + log1p(exp(-|x|))`` share the ``log1p`` term and never
    overflow; ``log(1 - sigmoid(x))`` is never formed.
    """

    @staticmethod
    def forward(ctx, logits, target, pos_weight):
        dtype = compute_dtype(torch.promote_types(logits.dtype, target.dtype))
        x, y = logits.to(dtype), target.to(dtype)
        tail = torch.log1p(torch.exp(-x.abs()))
        softplus_neg = torch.clamp_min(-x, 0) + tail
        softplus_pos = torch.clamp_min(x, 0) + tail
        positive = y * softplus_neg
        if pos_weight is not None:
            positive = positive * pos_weight.to(dtype)
        ctx.save_for_backward(logits, target, pos_weight)
        return positive + (1 - y) * softplus_pos

    @staticmethod
    def backward(ctx, grad):
        logits, target, pos_weight = ctx.saved_tensors
        dtype = grad.dtype
        x, y = logits.to(dtype), target.to(dtype)
        small = torch.exp(-x.abs())
        # sigmoid(x) and sigmoid(-x) each from exp(-|x|): neither is 1 - the other.
        sig_pos = torch.where(x >= 0, 1, small) / (1 + small)
        sig_neg = torch.where(x >= 0, small, 1) / (1 + small)
        pw = 1 if pos_weight is None else pos_weight.to(dtype)
        grad_logits = grad_target = grad_pos_weight = None
        if ctx.needs_input_grad[0]:
            # (1 - y) sigmoid(x) - pw y sigmoid(-x); for pw = 1 this is sigmoid(x) - y
            # without its cancellation at y = 1, x >> 0.
            grad_logits = grad * ((1 - y) * sig_pos - pw * y * sig_neg)
            grad_logits = grad_logits.sum_to_size(logits.shape).to(logits.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            tail = torch.log1p(small)
            softplus_neg = torch.clamp_min(-x, 0) + tail
            if ctx.needs_input_grad[1]:
                softplus_pos = torch.clamp_min(x, 0) + tail
                grad_target = (
                    (grad * (pw * softplus_neg - softplus_pos))
                    .sum_to_size(target.shape)
                    .to(target.dtype)
                )
            if ctx.needs_input_grad[2]:
                grad_pos_weight = (
                    (grad * y * softplus_neg).sum_to_size(pos_weight.shape).to(pos_weight.dtype)
                )
        return grad_logits, grad_target, grad_pos_weight


def binary_cross_entropy_with_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy from logits, stable for any ``|logits|``.

    Same semantics as :func:`torch.nn.functional.binary_cross_entropy_with_logits`
    (without its ``weight`` argument): elementwise
    ``-(pos_weight * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x)))``, evaluated
    as ``pos_weight * y * softplus(-x) + (1 - y) * softplus(x)`` with
    ``softplus(t) = max(t, 0) + log1p(exp(-|t|))``: no overflow, no ``log(0)``.

    Parameters
    ----------
    logits : Tensor
        Real floating-point scores.
    target : Tensor
        Real floating-point targets (usually in ``[0, 1]``), the shape of ``logits``.
    pos_weight : Tensor, optional
        Weight of the positive term, broadcast against ``logits`` (a per-class vector
        of shape ``(C,)`` broadcasts over the last dimension), as in PyTorch.
    reduction : {"mean", "sum", "none"}, default "mean"

    Returns
    -------
    Tensor
        In the dtype of ``logits`` (float16/bfloat16 are computed in float32 and
        rounded once; sums accumulate in float64 for float32). The gradient
        ``(1 - y) sigmoid(x) - pos_weight * y * sigmoid(-x)`` takes both sigmoids from
        ``exp(-|x|)``: finite everywhere and accurate in both tails (PyTorch's
        ``sigmoid(x) - y`` is exactly 0 for ``y = 1`` once ``sigmoid(x)`` rounds to 1).
        ``target`` and ``pos_weight`` are differentiable too.

    Raises
    ------
    TypeError
        If ``logits``, ``target`` or ``pos_weight`` is not a real floating-point tensor.
    ValueError
        If ``target`` does not have the shape of ``logits``, ``pos_weight`` does not
        broadcast to it, or ``reduction`` is not one of the three choices.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import binary_cross_entropy_with_logits
    >>> x = torch.tensor([100.0, -100.0])
    >>> binary_cross_entropy_with_logits(x, torch.tensor([0.0, 1.0]), reduction="none")
    tensor([100., 100.])
    """
    logits = require_float_tensor(logits, "logits")
    target = require_float_tensor(target, "target")
    if target.shape != logits.shape:
        raise ValueError(
            f"target must have the shape of logits, {tuple(logits.shape)}; "
            f"got {tuple(target.shape)}"
        )
    if pos_weight is not None:
        pos_weight = require_float_tensor(pos_weight, "pos_weight")
        try:
            shape = torch.broadcast_shapes(pos_weight.shape, logits.shape)
        except RuntimeError:
            shape = None
        if shape != logits.shape:
            raise ValueError(
                f"pos_weight of shape {tuple(pos_weight.shape)} does not broadcast to the "
                f"shape of logits, {tuple(logits.shape)}"
            )
    require_choice(reduction, _REDUCTIONS, "reduction")
    losses = _BinaryCrossEntropyWithLogits.apply(logits, target, pos_weight)
    if reduction == "none":
        return losses.to(logits.dtype)
    total = losses.sum(dtype=_wide_dtype(logits.dtype))
    if reduction == "sum":
        return total.to(logits.dtype)
    return (total / logits.numel()).to(logits.dtype)
