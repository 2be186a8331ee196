"""Softmax and log-softmax along one dimension, correctly rounded in practice, with masks.

Where PyTorch loses digits
--------------------------
``exp(x - m)``, with ``m`` the row maximum, is the textbook stable softmax, but forming
``x - m`` rounds: in float32, ``x = 0.98`` and ``m = 33.58`` give a difference whose
rounding error ``exp`` turns into a relative error of 2**-19 (about 60 ulp) in the
result. The float32 sum adds a few ulp more, and ``log`` of a sum ``1 + rest`` with a
tiny ``rest`` returns 0 instead of ``rest``, so ``torch.log_softmax`` rounds the largest
log-probability of a confident row to 0. Backward, ``g - exp(out) * sum(g)`` takes
``exp`` of a rounded log-probability: in float32 an ``out`` of -80 carries an absolute
error of 2**-18, a relative error of the probability of ``80 * 2**-24``, some 40 ulp.

What is done here
-----------------
* float32 input is computed in float64 and float16/bfloat16 input in float32: the
  difference of two input values is exact there (it needs at most 24 + 29 or 8 + 16
  bits), every later step carries more digits than the output keeps, and the result is
  rounded once. float64 input has no wider type: Knuth's TwoSum recovers the rounding
  error ``err`` of ``x - m``, ``exp(x - m)`` is taken as ``exp(d) * (1 + err)`` and
  the sum of the terms is carried as an unevaluated pair ``hi + lo`` whose ``hi`` is
  exact (the terms are split on a fixed grid, Rump, Ogita & Oishi), so the quotient is
  rounded about twice instead of once per step.
* The log-normaliser is ``log(top) + log1p(rest / top)``: ``top`` counts the entries
  equal to the maximum (their term is exactly ``exp(0) = 1``) and ``rest`` sums the
  others, so ``log_softmax([0, -30])`` is ``[-9.36e-14, -30]``, not ``[0, -30]``.
* float32/float16/bfloat16 softmax runs PyTorch's fused kernel on a copy in the wide
  dtype (its errors there are far below an ulp of the output).
* Gradients: float32 and float64 softmax use PyTorch's fused kernel on the saved
  output (within 2 and 4 ulp). Every other case recomputes the probabilities from the
  saved input and per-row statistics in the wide dtype (float64 input: with the
  compensation above), so the gradient is rounded once from wide values rather than
  computed from an output already rounded to the input dtype. The saved tensor is the
  input instead of the output: the same number of bytes.

* float32 log-softmax on CPU skips the exact ``x - m`` where it is not needed (checked
  per block, which costs no synchronisation there): with every row maximum within
  ``2**12`` and every row total at least ``1 + 2**-8``, the terms are
  ``exp2(x * log2(e) - m * log2(e))`` (one pass), the normaliser is ``log(total)`` and
  the result ``x - (m + log_norm)``; each rounding is then below ``2**-30`` of the
  result, as no log-probability is nearer 0 than ``-2**-8``. The gradient folds its
  shift the same way where no probability is near 1. Elsewhere, on CUDA and under
  compilation the exact steps above run.

On CPU the rows are processed in blocks whose wide scratch buffers stay in cache and are
reused, so no full-size temporary is allocated (a fresh 512 MiB buffer costs more in page
faults than the arithmetic done in it).

References
----------
.. [1] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp
   and softmax functions", IMA Journal of Numerical Analysis 41(4), 2021.
.. [2] D. E. Knuth, The Art of Computer Programming, vol. 2, 3rd ed., section 4.2.2
   (TwoSum).
.. [3] S. M. Rump, T. Ogita, S. Oishi, "Accurate floating-point summation part I:
   faithful rounding", SIAM J. Sci. Comput. 31(1), 2008 (error-free vector splitting).
"""

from __future__ import annotations

import math

import torch

from finite._checks import normalize_dim, require_float_tensor
from finite.ops._rows import Scratch, as_rows, from_rows, row_blocks

__all__ = ["log_softmax", "softmax"]

# Elements per block of rows on CPU: the float64 scratch buffers of this size (8 MiB
# each) stay in the shared cache. On CUDA the blocks only bound the scratch memory
# (128 MiB per float64 buffer).
_CPU_BLOCK_ELEMENTS = 1 << 20
_CUDA_BLOCK_ELEMENTS = 1 << 24
_LOG2_E = math.log2(math.e)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# A row total (float64) at least this large is far enough above its count of maxima for
# log(total) to keep the digits of the rest (see _log_normaliser).
_PLAIN_LOG_TOTAL = 1 + 2.0**-8
# Row shifts (float64) within this bound let x * log2(e) - shift * log2(e) take the
# place of the exact x - shift in the forward pass (see _folded_log_normaliser).
_FOLDED_SHIFT_BOUND = 2.0**12
# The gradient takes that place too where no probability is near 1 (log_norm >= this).
_FOLDED_MIN_LOG_NORM = 2.0**-8


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which ``x - max`` is exact: float64 for float32, float32 for
    float16/bfloat16; float64 stays float64 (and is compensated instead)."""
    if dtype in _LOW_PRECISION:
        return torch.float32
    return torch.float64


# --------------------------------------------------------------------------------------
# Layout: the softmax dimension last, as a (rows, classes) matrix, processed in blocks
# --------------------------------------------------------------------------------------


def _to_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as (rows, size along ``dim``), ``dim`` moved last; a view when possible."""
    return as_rows(t, (dim,))


def _from_rows(t2: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Undo :func:`_to_rows`; the result is contiguous, like PyTorch's."""
    return from_rows(t2, shape, (dim,)).contiguous()


def _row_blocks(rows: int, cols: int, device: torch.device) -> list[slice]:
    return row_blocks(
        rows,
        cols,
        device,
        cpu_elements=_CPU_BLOCK_ELEMENTS,
        cuda_elements=_CUDA_BLOCK_ELEMENTS,
    )


class _Scratch(Scratch):
    """Reusable (block rows, cols) buffers in the wide dtype of ``like``."""

    def __init__(self, like: torch.Tensor, blocks: list[slice]):
        super().__init__(blocks, like.shape[1], _wide_dtype(like.dtype), like.device)


def _load(xb: torch.Tensor, mask_b: torch.Tensor | None, scratch: _Scratch) -> torch.Tensor:
    """The block in the wide dtype with the entries outside the mask set to -inf (NaN
    ones included): ``xb`` itself when it is wide and unmasked, else a scratch copy."""
    if xb.dtype == scratch.dtype and mask_b is None:
        return xb
    wide = scratch.get("wide", xb.shape[0]).copy_(xb)
    if mask_b is not None:
        wide.masked_fill_(~mask_b, -math.inf)
    return wide


# --------------------------------------------------------------------------------------
# The shifted exponentials
# --------------------------------------------------------------------------------------


def _shift(m: torch.Tensor) -> torch.Tensor:
    """The row maximum to subtract: 0 for an all -inf row (every ``x - m`` is -inf)."""
    return torch.where(m == -math.inf, 0, m)


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
    m_safe = _shift(m).to(scratch.dtype)
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


def _log_normaliser(
    terms: torch.Tensor, m: torch.Tensor, *, plain_log: bool = False
) -> torch.Tensor:
    """``log(sum(exp(x - m)))`` per row, float64, from the terms ``exp(x - m)``.

    The terms are at most 1, exactly 1 at the maxima (``exp(0)``), so ``trunc`` counts the
    maxima (``top``) and ``frac`` keeps the rest: ``log(top) + log1p(rest / top)`` keeps
    the digits of a ``rest`` far below 1. Consumes ``terms``. An all -inf row gives
    +inf, a NaN row NaN.

    ``plain_log`` (float64 terms of float32 input): where every row total is at least
    ``1 + 2**-8`` (checked on CPU), ``log(total)`` instead. Its rounding, about
    ``2**-50`` relative (pairwise summation), grows by at most ``2**8`` in ``log_norm``
    (``total / log(total) / log_norm``), far below a float32 ulp; and it does not need
    the maxima's terms to be exactly 1.
    """
    # Summed in the wide dtype: float64 for float32 input; float32 sums of float16/
    # bfloat16 terms err by a few float32 ulp, 2**-14 of theirs.
    total = terms.sum(dim=-1, keepdim=True).double()
    if plain_log and _all_at_least(total, _PLAIN_LOG_TOTAL):
        # No all -inf or NaN row is left to settle: their totals are 0 and NaN.
        return torch.log(total)
    rest = terms.frac_().sum(dim=-1, keepdim=True).double()
    top = torch.round(total - rest)
    return _settle_rows(torch.log(top) + torch.log1p(rest / top), m)


def _all_at_least(values: torch.Tensor, bound: float) -> bool:
    """Whether every one of ``values`` is ``>= bound`` (NaN is not): checked on CPU,
    where reading a tensor costs no synchronisation; assumed not elsewhere and under
    compilation."""
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool((values >= bound).all())


def _all_within(values: torch.Tensor, bound: float, wide_dtype: torch.dtype) -> bool:
    """Whether every one of ``values`` has ``|value| <= bound``, for float64 wide
    values only (float32 input); CPU only, as :func:`_all_at_least`."""
    return wide_dtype == torch.float64 and _all_at_least(-values.abs(), -bound)


def _folded_log_normaliser(wide: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
    """``log(sum(exp(x - shift)))`` per row from ``exp2(x * log2(e) - shift * log2(e))``
    in place of a float64 copy (consumed), or None where some row total is below
    ``1 + 2**-8`` (the caller then takes the exact path).

    With ``|shift| <= 2**12`` the exponent errs by about ``(|x| + |shift|) * 2**-52``
    for every term that is not 0, a relative error below ``2**-38``. The maxima's terms
    need not be exactly 1 (the multiply-add may be fused): :func:`_log_normaliser`'s
    plain ``log(total)`` is used only.
    """
    offset = shift * -_LOG2_E
    terms = torch.add(offset, wide, alpha=_LOG2_E, out=wide).exp2_()
    total = terms.sum(dim=-1, keepdim=True)
    if not _all_at_least(total, _PLAIN_LOG_TOTAL):
        return None
    return torch.log(total)


def _settle_rows(log_norm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """+inf for an all -inf row (every probability 0), NaN for a NaN row."""
    log_norm = torch.where(m == -math.inf, math.inf, log_norm)
    return torch.where(m.isnan(), math.nan, log_norm)


def _store(wide: torch.Tensor, out: torch.Tensor) -> None:
    """Round ``wide`` into ``out`` once (a mixed-dtype arithmetic op writing ``out``
    directly is a slow path on CPU; a plain copy is not)."""
    out.copy_(wide)


# --------------------------------------------------------------------------------------
# Wide dtype (float32, float16, bfloat16 input)
# --------------------------------------------------------------------------------------


def _may_reach(values: torch.Tensor, bound: float) -> bool:
    """Whether some of ``values`` may be ``>= bound``: checked on CPU, where reading a
    tensor costs no synchronisation; assumed elsewhere and under compilation."""
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return bool((values >= bound).any())


def _clamped_max(wide: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Row maxima of a wide copy whose +inf entries are first lowered to the largest
    finite wide value: still above every finite input value, so the +inf entries of a
    row share it (``x - m = 0`` there) and ``inf - inf`` never arises. ``source``, the
    narrow block ``wide`` was copied from (unmasked), gives the same maxima reading
    half the bytes."""
    m = (wide if source is None else source).amax(dim=-1, keepdim=True)
    return _clamp_infinities(wide, m.to(wide.dtype))


def _clamp_infinities(wide: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Lower +inf entries of ``wide`` to the largest finite value, in place, where a row
    maximum (or the saved shift of such a row) ``m`` reaches it; returns ``m`` lowered
    alike. Input values never reach it: float32 and float16/bfloat16 ones are far below
    the largest float64 and float32."""
    big = torch.finfo(wide.dtype).max
    if _may_reach(m, big):
        wide.clamp_(max=big)
        m = m.clamp(max=big)
    return m


def _reciprocal_total(total: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``1 / total`` per row: 0 for an all -inf row (its probabilities are 0 rather
    than 0/0), NaN for a NaN row (whose total is NaN)."""
    return torch.where(m == -math.inf, 0, 1 / total)


def _wide_probabilities(
    wide: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``exp(x - shift) * scale`` in place of a clamped wide copy: ``x - shift`` is
    exact, and the rest errs by a few ulp of the wide dtype (see :func:`_exp`)."""
    return _exp(wide.sub_(shift), None, out=wide).mul_(scale)


def _wide_log_probabilities(
    wide: torch.Tensor, shift: torch.Tensor, log_norm: torch.Tensor
) -> torch.Tensor:
    """``exp(x - shift - log_norm)`` in place of a clamped wide copy.

    ``x - shift`` is exact; rounding ``(x - shift) * log2(e) - log_norm * log2(e)`` costs
    a relative error of about ``|x - shift - log_norm| * 2**-53`` (float64) or
    ``2**-24`` (float32), far below an ulp of the input dtype.
    """
    wide.sub_(shift)
    return torch.add(-log_norm * _LOG2_E, wide, alpha=_LOG2_E, out=wide).exp2_()


def _foldable_gradient(wide: torch.Tensor, shift: torch.Tensor, log_norm: torch.Tensor) -> bool:
    """Whether :func:`_folded_log_probabilities` may replace
    :func:`_wide_log_probabilities` (float32 input, CPU): every ``|shift| <= 2**12``
    and every ``log_norm >= 2**-8``, so that no probability is within ``2**-9`` of 1."""
    return _all_within(shift, _FOLDED_SHIFT_BOUND, wide.dtype) and _all_at_least(
        log_norm, _FOLDED_MIN_LOG_NORM
    )


def _folded_log_probabilities(
    wide: torch.Tensor, shift: torch.Tensor, log_norm: torch.Tensor
) -> torch.Tensor:
    """``exp2(x * log2(e) - (shift + log_norm) * log2(e))`` in place of a float64 copy,
    one pass fewer than :func:`_wide_log_probabilities`.

    Under :func:`_foldable_gradient`'s bounds the exponent errs by about
    ``(|x| + |shift|) * 2**-52``, below ``2**-37`` for every probability that is not 0:
    a relative error far below a float32 ulp. It is not exact at the maxima, hence the
    bound on ``log_norm``: ``g - p * sum(g)`` with ``p`` near 1 would keep the error.
    """
    offset = (shift + log_norm).mul_(-_LOG2_E)
    return torch.add(offset, wide, alpha=_LOG2_E, out=wide).exp2_()


# --------------------------------------------------------------------------------------
# float64: compensated terms and a double-word sum
# --------------------------------------------------------------------------------------


def _double_word_sums(
    terms: torch.Tensor, error: torch.Tensor, scratch: _Scratch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of float64 terms ``t = exp(d)`` in [0, 1] (``d + error = x - m``):
    ``top``, the number of terms equal to 1, and ``rest = rest_hi + rest_lo``, the sum of
    the others plus ``sum(t * error)``, with ``rest_hi`` exact.

    The fractional parts are scaled by ``2**(52 - b)``, ``2**b`` above the row length,
    and split into integers and remainders (exact): the integers add up to less than
    ``2**52``, so their sum is exact in any order, and only the small remainders and
    corrections are rounded (Rump, Ogita & Oishi's error-free vector transformation).
    """
    rows, cols = terms.shape
    scale = 2.0 ** (52 - cols.bit_length())
    total = terms.sum(dim=-1, keepdim=True)
    scaled = torch.frac(terms, out=scratch.get("split", rows)).mul_(scale)
    integers = torch.round(scaled, out=scratch.get("integers", rows))
    rest_hi = integers.sum(dim=-1, keepdim=True) / scale
    rest_lo = scaled.sub_(integers).sum(dim=-1, keepdim=True) / scale
    rest_lo += torch.mul(terms, error, out=integers).sum(dim=-1, keepdim=True)
    # The rounded total errs by far less than 1/2: total - rest is the count of ones.
    top = torch.round(total - rest_hi - rest_lo)
    return top, rest_hi, rest_lo


def _row_totals(
    top: torch.Tensor, rest_hi: torch.Tensor, rest_lo: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(exp(x - m)) = hi + lo`` (``hi = top + rest_hi`` is exact); an all -inf row
    gets ``hi = 1`` (its probabilities are 0 rather than 0/0), a NaN row ``hi = NaN``."""
    hi = torch.where(m == -math.inf, 1, top + rest_hi)
    return torch.where(m.isnan(), math.nan, hi), rest_lo


def _double_word_probabilities(
    terms: torch.Tensor,
    error: torch.Tensor,
    total_hi: torch.Tensor,
    total_lo: torch.Tensor,
) -> torch.Tensor:
    """``exp(d + error) / (total_hi + total_lo)`` in place of ``terms = exp(d)``
    (float64).

    ``q = exp(d) / total_hi`` is rounded once; ``q * (1 + error - total_lo / total_hi)``
    folds both corrections in with one more rounding, so the result is within about
    1.5 ulp (exp's own error included). Consumes ``error``.
    """
    probs = terms.div_(total_hi)
    error.sub_(total_lo / total_hi)
    return probs.addcmul_(probs, error)


def _log_double_word(
    top: torch.Tensor, rest_hi: torch.Tensor, rest_lo: torch.Tensor
) -> torch.Tensor:
    """``log(top + rest_hi + rest_lo)`` per row as ``log(top) + log1p(rest / top)``:
    ``rest`` is the rounded sum of the two parts (TwoSum) and its rounding error enters
    by its first-order term."""
    rest = rest_hi + rest_lo
    b_virtual = rest - rest_hi
    residual = (rest_hi - (rest - b_virtual)) + (rest_lo - b_virtual)
    ratio = rest / top
    return torch.log(top) + (torch.log1p(ratio) + residual / top / (1 + ratio))


def _double_word_stats(
    x: torch.Tensor, m: torch.Tensor, scratch: _Scratch
) -> tuple[torch.Tensor, ...]:
    """For a float64 block: ``d``, its ``error``, ``terms = exp(d)``, ``top``,
    ``rest_hi`` and ``rest_lo`` (see :func:`_double_word_sums`)."""
    d, error = _shifted(x, m, scratch)
    terms = torch.exp(d, out=scratch.get("terms", x.shape[0]))
    return d, error, terms, *_double_word_sums(terms, error, scratch)


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


def _block_mask(mask2: torch.Tensor | None, block: slice) -> torch.Tensor | None:
    return None if mask2 is None else mask2[block]


# --------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, mask2):
        out = torch.empty_like(x2)
        blocks = _row_blocks(*x2.shape, x2.device)
        scratch = _Scratch(x2, blocks)
        stats = []
        for block in blocks:
            wide = _load(x2[block], _block_mask(mask2, block), scratch)
            if x2.dtype == torch.float64:
                m = wide.amax(dim=-1, keepdim=True)
                _, error, terms, top, rest_hi, rest_lo = _double_word_stats(wide, m, scratch)
                total_hi, total_lo = _row_totals(top, rest_hi, rest_lo, m)
                probs = _double_word_probabilities(terms, error, total_hi, total_lo)
            else:
                m = _clamped_max(wide)
                shift = _shift(m)
                terms = _exp(wide.sub_(shift), None, out=wide)
                scale = _reciprocal_total(terms.sum(dim=-1, keepdim=True), m)
                probs = terms.mul_(scale)
                stats.append(torch.cat([shift, scale], dim=1))
            _store(probs, out[block])
        # float16/bfloat16: the gradient is recomputed in float32 from the input and the
        # per-row shift and scale; float32/float64 use the saved output.
        ctx.recompute = x2.dtype in _LOW_PRECISION
        if ctx.recompute:
            ctx.save_for_backward(x2, mask2, torch.cat(stats))
        else:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.recompute:
            (y,) = ctx.saved_tensors
            return torch._softmax_backward_data(grad, y, -1, y.dtype), None
        x2, mask2, stats = ctx.saved_tensors
        grad_x = torch.empty_like(x2)
        blocks = _row_blocks(*x2.shape, x2.device)
        scratch = _Scratch(x2, blocks)
        for block in blocks:
            rows = block.stop - block.start
            wide = _load(x2[block], _block_mask(mask2, block), scratch)
            shift, scale = stats[block].split(1, dim=1)
            _clamp_infinities(wide, shift)
            probs = _wide_probabilities(wide, shift, scale)
            grad_wide = scratch.get("grad", rows).copy_(grad[block])
            # p * (g - sum(g * p)) in float32, rounded once to the input dtype.
            result = scratch.get("result", rows)
            torch._softmax_backward_data(grad_wide, probs, -1, probs.dtype, grad_input=result)
            _store(result, grad_x[block])
        return grad_x, None


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

        The gradient is ``y * (g - sum(g * y))``: for float32 and float64 PyTorch's
        kernel on the saved output (within 2 and 3 ulp); for float16 and bfloat16 it
        is computed in float32 from probabilities recomputed from the saved input and
        rounded once (the rounded output would cost up to 1.5 ulp). Either way one
        tensor of the input's size is saved (plus two floats per row).

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
        out = torch.empty_like(x2)
        blocks = _row_blocks(*x2.shape, x2.device)
        scratch = _Scratch(x2, blocks)
        native = x2.dtype == torch.float64
        stats = []
        for block in blocks:
            wide = _load(x2[block], _block_mask(mask2, block), scratch)
            if native:
                m = wide.amax(dim=-1, keepdim=True)
                d, error, _, top, rest_hi, rest_lo = _double_word_stats(wide, m, scratch)
                log_norm = _log_double_word(top, rest_hi, rest_lo)
                log_norm = _settle_rows(log_norm, m)
                # (x - m) - log_norm = (d - log_norm) + error: |result| >= |d|, so the
                # two roundings are each at most half an ulp of the result.
                _store(d.sub_(log_norm).add_(error), out[block])
                stats.append(torch.cat([_shift(m), *_row_totals(top, rest_hi, rest_lo, m)], 1))
            else:
                xb, mask_b = x2[block], _block_mask(mask2, block)
                m = _clamped_max(wide, xb if mask_b is None else None)
                shift = _shift(m)
                log_norm = None
                if _all_within(shift, _FOLDED_SHIFT_BOUND, wide.dtype):
                    log_norm = _folded_log_normaliser(wide, shift)
                    if log_norm is None:
                        # Consumed; such rows hold no +inf entry to clamp again.
                        wide = _load(xb, mask_b, scratch)
                if log_norm is None:
                    d = wide.sub_(shift)
                    terms = _exp(d, None, out=scratch.get("terms", wide.shape[0]))
                    plain = x2.dtype == torch.float32
                    log_norm = _log_normaliser(terms, m, plain_log=plain).to(d.dtype)
                    # d is exact and the one rounding of d - log_norm is in the wide dtype.
                    _store(d.sub_(log_norm), out[block])
                else:
                    # log_norm >= log(1 + 2**-8) and |shift| <= 2**12: rounding
                    # shift + log_norm costs at most 2**-33 of the result.
                    wide = _load(xb, mask_b, scratch)
                    _store(wide.sub_(shift + log_norm), out[block])
                stats.append(torch.cat([shift, log_norm], 1))
        ctx.save_for_backward(x2, mask2, torch.cat(stats))
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, mask2, stats = ctx.saved_tensors
        grad_x = torch.empty_like(x2)
        blocks = _row_blocks(*x2.shape, x2.device)
        scratch = _Scratch(x2, blocks)
        for block in blocks:
            mask_b = _block_mask(mask2, block)
            wide = _load(x2[block], mask_b, scratch)
            shift, *normaliser = stats[block].split(1, dim=1)
            if x2.dtype == torch.float64:
                d, error = _shifted(wide, shift, scratch)
                probs = _double_word_probabilities(torch.exp(d, out=d), error, *normaliser)
            elif _foldable_gradient(wide, shift, *normaliser):
                probs = _folded_log_probabilities(wide, shift, *normaliser)
            else:
                _clamp_infinities(wide, shift)
                probs = _wide_log_probabilities(wide, shift, *normaliser)
            grad_wide = grad[block]
            if grad_wide.dtype != probs.dtype:
                grad_wide = scratch.get("grad", probs.shape[0]).copy_(grad_wide)
            # g - p * sum(g), every step in the wide dtype (float64 for float32 input:
            # the products are exact and the difference is rounded once).
            total = grad_wide.sum(dim=-1, keepdim=True)
            result = torch.addcmul(grad_wide, probs, total, value=-1, out=probs)
            if mask_b is not None:
                result.masked_fill_(~mask_b, 0)
            _store(result, grad_x[block])
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

        The gradient is ``g - p * sum(g)`` with the probabilities ``p`` recomputed
        from the saved input and per-row statistics in the wide dtype (float64 input:
        with TwoSum and the double-word row sum), and rounded once: within about half
        an ulp (float64: 2 ulp) where well conditioned. PyTorch takes ``exp`` of the
        saved output, whose rounding costs a relative error of ``|out| * 2**-24``
        (float32), tens of ulps for log-probabilities below -20. The input is saved
        instead of the output: the same number of bytes, plus two or three numbers per
        row.

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
