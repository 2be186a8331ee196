"""Attention with an online softmax: the (queries x keys) scores are never all in memory.

Queries and keys are processed in ``chunk x chunk`` tiles. For each block of queries the
forward walks over the key blocks keeping, per query row, the running maximum ``m``, the
running sum ``l`` of ``exp(s - m)`` and the running output ``o`` (all float32, whatever the
input dtype); when a new block raises the maximum to ``m'`` the old sum and output are
multiplied by ``exp(m - m') <= 1`` (Milakov & Gimelshein 2018; FlashAttention). Only the
output and the per-row ``logsumexp`` are saved for the backward, which recomputes each
tile's probabilities from them (FlashAttention-2's backward), so the extra memory in both
directions is O(sequence) plus one tile.

A row with no key to attend to (every key masked) has ``l = 0``: its output and its
gradients are 0, never ``0 / 0``.

Scores ``q k^T`` and the backward's ``dO v^T`` are float32 products for float16/bfloat16
inputs (the inputs widened once per call), so scores that would overflow float16 stay
finite and the softmax sees no rounded score. On CPU, bfloat16 inputs multiply the
probabilities and ``dS`` with bfloat16 products (``P V``, ``P^T dO``, ``dS K``,
``dS^T q``), which run about four times faster there than float32 ones: ``P`` and ``dS``
are rounded to bfloat16 as in PyTorch's fused CPU kernel and FlashAttention, and each
tile's product is rounded to bfloat16 before it is added to its float32 accumulator (the
fused kernel keeps that sum in float32; eager PyTorch on CPU has no bfloat16 product with
a float32 result). The errors are then 1 to 1.5 times those of
``F.scaled_dot_product_attention`` in bfloat16 (root-mean-square 2.5e-3 to 4.6e-3
relative, against 1.6e-3 for the exact result rounded once); pass float32 tensors for
float32 products throughout. float16 products stay float32 (slow on CPU, and they could
overflow). This is eager PyTorch, not a fused kernel: on CPU it runs within about
1.1-1.2x of ``F.scaled_dot_product_attention``; on CUDA the fused kernels are much faster
where they apply.

References
----------
.. [1] M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax",
   arXiv:1805.02867, 2018.
.. [2] M. N. Rabe, C. Staats, "Self-attention Does Not Need O(n^2) Memory",
   arXiv:2112.05682, 2021.
.. [3] T. Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
   IO-Awareness", NeurIPS 2022; T. Dao, "FlashAttention-2", arXiv:2307.08691, 2023.
.. [4] Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
   arXiv:2408.00118, 2024 (attention logit soft-capping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from finite._checks import compute_dtype, require_float_tensor

__all__ = ["attention"]

# Default tile: about 2**19 scores (2 MiB of float32) across the batch dimensions, with
# sides a power of two in [64, 1024].
_TILE_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class _Options:
    scale: float
    cap: float | None
    causal: bool
    chunk: int


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention without forming the full score matrix.

    Computes ``softmax(q @ k.T * scale + mask) @ v`` like
    :func:`torch.nn.functional.scaled_dot_product_attention` (without dropout), tile by
    tile with an online softmax; float16/bfloat16 inputs are computed with float32
    scores, running maxima, sums and outputs, and the result is rounded once (on CPU,
    bfloat16 inputs multiply probabilities with bfloat16 products; see the module notes).
    Extra memory, forward and backward: the float32 row statistics, float32 copies of
    ``q``, ``k``, ``v`` and ``dO`` and a float32 gradient of ``q`` (all O(sequence)),
    and a few ``chunk x chunk`` tiles per batch entry.

    Parameters
    ----------
    q : Tensor
        Queries, shape ``(..., L, E)``.
    k : Tensor
        Keys, shape ``(..., S, E)``, the batch dimensions ``...`` of ``q``.
    v : Tensor
        Values, shape ``(..., S, Ev)``.
    causal : bool, default False
        Query ``i`` attends to keys ``j <= i`` only (PyTorch's ``is_causal``: the
        top-left-aligned lower triangle). May be combined with ``mask``.
    mask : Tensor, optional
        Broadcastable to ``(..., L, S)``: bool (True = may attend) or floating point
        (added to the scores; ``-inf`` masks). Not differentiated.
    scale : float, optional
        Multiplies ``q @ k.T``; default ``1 / sqrt(E)``.
    softcap : float, optional
        Positive cap: scores become ``softcap * tanh(scores / softcap)`` after scaling and
        before the mask (Gemma 2).
    chunk_size : int, optional
        Side of the square tiles of queries x keys. Default: the power of two in
        ``[64, 1024]`` that makes a tile about ``2**19`` scores across the batch (256
        for 8 heads), fast on CPU caches.

    Returns
    -------
    Tensor
        Shape ``(..., L, Ev)``, dtype of ``q``. Rows with every key masked are 0, with
        zero gradients.

    Raises
    ------
    TypeError
        If an input is not a floating-point tensor or an option has the wrong type.
    ValueError
        If shapes, dtypes or devices disagree, an option is out of range, or ``mask``
        requires a gradient.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> q, k, v = (torch.randn(2, 3, 100, 8, dtype=torch.float64) for _ in range(3))
    >>> out = attention(q, k, v, causal=True, chunk_size=32)
    >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    True

    References
    ----------
    Milakov & Gimelshein (2018); Rabe & Staats (2021); Dao et al. (2022, 2023),
    FlashAttention 1 and 2; Gemma Team (2024), Gemma 2 (soft-capping).
    """
    q = require_float_tensor(q, "q")
    k = require_float_tensor(k, "k")
    v = require_float_tensor(v, "v")
    if q.ndim < 2:
        raise ValueError(f"q must have shape (..., L, E); got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.ndim != q.ndim or t.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"{name} must have the batch dimensions of q, {tuple(q.shape[:-2])}; "
                f"got shape {tuple(t.shape)}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k must have q's feature size {q.shape[-1]} in its last dimension; "
            f"got shape {tuple(k.shape)}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have as many rows as k ({k.shape[-2]}); got shape {tuple(v.shape)}"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    length, keys, features = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(features) if features else 1.0
    scale = _number(scale, "scale")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    cap = None
    if softcap is not None:
        cap = _number(softcap, "softcap")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"softcap must be a positive finite float, got {softcap!r}")
    batch = math.prod(q.shape[:-2])
    chunk = _chunk(chunk_size, batch)
    if mask is not None:
        mask = _check_mask(mask, q, length, keys)
    options = _Options(scale, cap, causal, chunk)
    return _Attention.apply(q, k, v, mask, options)


class _Attention(torch.autograd.Function):
    """Saved for backward: q, k, v, the output and the float32 row logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v, mask, options):
        out, lse = _forward(q, k, v, mask, options)
        ctx.options = options
        ctx.save_for_backward(q, k, v, mask, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, mask, out, lse, grad_out, ctx.options)
        return dq, dk, dv, None, None


def _blocks(size: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def _visible(qi: slice, ki: slice, causal: bool) -> bool:
    """Whether any query of ``qi`` may see a key of ``ki``."""
    return not causal or ki.start <= qi.stop - 1


def _crosses_diagonal(qi: slice, ki: slice, causal: bool) -> bool:
    """Whether some key of ``ki`` comes after some query of ``qi`` (needs masking)."""
    return causal and ki.stop - 1 > qi.start


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (batch, n, d): a view for contiguous tensors."""
    return t.reshape(math.prod(t.shape[:-2]), *t.shape[-2:])


def _transposed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, n, d) -> a contiguous (batch, d, n) copy in ``dtype``.

    Batched products of a transposed view run at about half the speed on CPU.
    """
    return t.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)


def _mask_tile(s, mask, batch, qi, ki):
    """Apply the user's mask (broadcast to (..., L, S)) to a (batch, rows, keys) tile."""
    tile = mask[..., qi, ki].expand(*batch, qi.stop - qi.start, ki.stop - ki.start)
    tile = tile.reshape(s.shape)
    if tile.dtype == torch.bool:
        s.masked_fill_(tile.logical_not(), -math.inf)
    else:
        s.add_(tile)


def _causal_tile(s, qi, ki):
    rows = torch.arange(qi.start, qi.stop, device=s.device)[:, None]
    cols = torch.arange(ki.start, ki.stop, device=s.device)[None, :]
    s.masked_fill_(cols > rows, -math.inf)


def _factor(options: _Options) -> float:
    # q is scaled once instead of every score; with a cap, to tanh's argument.
    return options.scale if options.cap is None else options.scale / options.cap


def _low_products(q: torch.Tensor) -> bool:
    """Whether the products with probabilities run in bfloat16: bfloat16 inputs on CPU."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu"


class _Scratch:
    """Buffers reused from tile to tile: ``get(name, shape, dtype)`` is a contiguous view."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = torch.empty(size, dtype=dtype, device=self.device)
            self.buffers[name] = buffer
        return buffer[:size].view(shape)


def _forward(q, k, v, mask, options):
    wide, low = compute_dtype(q.dtype), _low_products(q)
    batch, factor, cap = q.shape[:-2], _factor(options), options.cap
    q3, k3, v3 = _flat(q), _flat(k), _flat(v)
    n, values = q3.shape[0], v.shape[-1]
    out = torch.empty(*q.shape[:-1], values, dtype=q.dtype, device=q.device)
    out3 = _flat(out)
    lse = torch.empty(q3.shape[:-1], dtype=wide, device=q.device)
    # Widened once per call, O(sequence): keys transposed block by block, values.
    key_blocks = _blocks(k.shape[-2], options.chunk)
    kts = [_transposed(k3[:, ki], wide) for ki in key_blocks]
    # bfloat16 products copy operands that are not contiguous: give them blocks that are.
    vs = [v3[:, ki].contiguous() if low else v3[:, ki].to(wide) for ki in key_blocks]
    scratch = _Scratch(q.device)
    for qi in _blocks(q.shape[-2], options.chunk):
        qs = q3[:, qi].to(wide) * factor
        rows = qi.stop - qi.start
        m = torch.full((n, rows, 1), -math.inf, dtype=wide, device=q.device)
        total = torch.zeros_like(m)
        acc = torch.zeros(n, rows, values, dtype=wide, device=q.device)
        for kt, vb, ki in zip(kts, vs, key_blocks, strict=True):
            if not _visible(qi, ki, options.causal):
                break  # every later key comes after every query of the block
            s = torch.bmm(qs, kt, out=scratch.get("s", (n, rows, kt.shape[-1]), wide))
            if cap is not None:
                torch.tanh(s, out=s).mul_(cap)
            if mask is not None:
                _mask_tile(s, mask, batch, qi, ki)
            if _crosses_diagonal(qi, ki, options.causal):
                _causal_tile(s, qi, ki)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # Rows with nothing unmasked yet keep m = -inf: shift them by 0, not -inf.
            shift = torch.where(torch.isneginf(m_new), 0, m_new)
            p = s.sub_(shift).exp_()  # exp(s - m') <= 1
            correction = torch.exp(m - shift)  # exp(m - m') <= 1; 0 while m = -inf
            total.mul_(correction).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(correction)
            if low:
                p_low = scratch.get("low", p.shape, q.dtype).copy_(p)
                product = scratch.get("product", acc.shape, q.dtype)
                acc.add_(torch.bmm(p_low, vb, out=product))
            else:
                acc.baddbmm_(p, vb)
            m = m_new
        empty = total == 0
        # A row that attends to nothing gets 0; lse = +inf makes its recomputed
        # probabilities exp(s - inf) = 0 in the backward.
        out3[:, qi] = torch.where(empty, 0, acc / torch.where(empty, 1, total))
        shift = torch.where(torch.isneginf(m), 0, m)
        lse[:, qi] = torch.where(empty, math.inf, shift + torch.log(total)).squeeze(-1)
    return out, lse.reshape(q.shape[:-1])


def _backward(q, k, v, mask, out, lse, grad_out, options):
    wide, low = compute_dtype(q.dtype), _low_products(q)
    batch, factor, cap = q.shape[:-2], _factor(options), options.cap
    q3, k3, v3, do3, out3 = _flat(q), _flat(k), _flat(v), _flat(grad_out), _flat(out)
    n = q3.shape[0]
    neg_lse = -_flat(lse[..., None])
    # Per block of queries, once per call (O(sequence)): q scaled and widened, dO widened
    # and D_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward's row term.
    query_blocks = _blocks(q.shape[-2], options.chunk)
    rows = []
    for qi in query_blocks:
        do = do3[:, qi].to(wide)
        neg_delta = (do * out3[:, qi].to(wide)).sum(dim=-1, keepdim=True).neg_()
        rows.append((qi, q3[:, qi].to(wide) * factor, do, neg_delta))
    dq = torch.zeros(q3.shape, dtype=wide, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dk3, dv3 = _flat(dk), _flat(dv)
    scratch = _Scratch(q.device)
    for ki in _blocks(k.shape[-2], options.chunk):
        kt = _transposed(k3[:, ki], wide)
        vt = _transposed(v3[:, ki], wide)
        kb = k3[:, ki].contiguous() if low else k3[:, ki].to(wide)
        cols = ki.stop - ki.start
        dk_block = torch.zeros(n, cols, k.shape[-1], dtype=wide, device=q.device)
        dv_block = torch.zeros(n, cols, v.shape[-1], dtype=wide, device=q.device)
        for qi, qs, do, neg_delta in rows:
            if not _visible(qi, ki, options.causal):
                continue
            shape = (n, qi.stop - qi.start, cols)
            s = scratch.get("s", shape, wide)
            if cap is None:
                # s - lse in one product: baddbmm adds the broadcast -lse.
                torch.baddbmm(neg_lse[:, qi], qs, kt, out=s)
                tanh = None
            else:
                torch.bmm(qs, kt, out=s)
                tanh = torch.tanh(s, out=scratch.get("tanh", shape, wide))
                torch.mul(tanh, cap, out=s).add_(neg_lse[:, qi])
            if mask is not None:
                _mask_tile(s, mask, batch, qi, ki)
            if _crosses_diagonal(qi, ki, options.causal):
                _causal_tile(s, qi, ki)
            p = s.exp_()
            if low:
                # bfloat16 operands, contiguous (the products would copy strided ones).
                do_low = scratch.get("do", do.shape, q.dtype).copy_(do3[:, qi])
                p_low = scratch.get("low", shape, q.dtype).copy_(p)
                product = scratch.get("product", dv_block.shape, q.dtype)
                dv_block.add_(torch.bmm(p_low.transpose(1, 2), do_low, out=product))
            else:
                dv_block.baddbmm_(p.transpose(1, 2), do)
            # dS = P * (dP - D), with dP - D = dO V^T - D in one product.
            ds = torch.baddbmm(neg_delta, do, vt, out=scratch.get("ds", shape, wide))
            ds.mul_(p)
            if tanh is not None:
                # s = cap tanh(t) with t = q.k scale / cap: ds/d(q.k) = scale (1 - tanh**2).
                ds.mul_(tanh.square_().neg_().add_(1))
            if low:
                ds_low = scratch.get("low", shape, q.dtype).copy_(ds)
                product = scratch.get("product", qs.shape, q.dtype)
                dq[:, qi].add_(torch.bmm(ds_low, kb, out=product))
                q_low = scratch.get("q", qs.shape, q.dtype).copy_(q3[:, qi])
                product = scratch.get("product", dk_block.shape, q.dtype)
                dk_block.add_(torch.bmm(ds_low.transpose(1, 2), q_low, out=product))
            else:
                dq[:, qi].baddbmm_(ds, kb)
                dk_block.baddbmm_(ds.transpose(1, 2), qs)
        if low:
            # Products of the unscaled q: dk = scale * dS^T q.
            dk_block.mul_(options.scale)
        elif cap is not None:
            # qs = q * factor: dk = scale * dS^T q = (scale / factor) * dS^T qs.
            dk_block.mul_(cap)
        dk3[:, ki] = dk_block
        dv3[:, ki] = dv_block
    dq.mul_(options.scale)
    return dq.reshape(q.shape).to(q.dtype), dk, dv


def _check_mask(mask: object, q: torch.Tensor, length: int, keys: int) -> torch.Tensor:
    """``mask`` expanded (a view) to (..., L, S), after checking it."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise TypeError(f"mask must be bool or floating point, got dtype {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    if mask.requires_grad:
        raise ValueError("mask requires grad, but attention does not differentiate it; detach it")
    full = (*q.shape[:-2], length, keys)
    try:
        shape = torch.broadcast_shapes(mask.shape, full)
    except RuntimeError:
        shape = None
    if shape != torch.Size(full):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to {full} "
            f"(the batch dimensions, L, S)"
        )
    return mask.expand(full)


def _chunk(chunk_size: object, batch: int) -> int:
    if chunk_size is None:
        side = math.isqrt(max(1, _TILE_ELEMENTS // max(batch, 1)))
        return min(1024, max(64, 1 << (side.bit_length() - 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)
