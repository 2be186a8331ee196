"""Sums, means, variances and norms that keep the digits plain accumulation loses.

``compensated_sum`` is accurate as if the sum were carried in twice the working
precision and rounded once; ``mean_var`` is a two-pass variance that is never negative;
``l2_norm`` scales by a power of two before squaring, so it neither overflows nor
underflows. float32, float16 and bfloat16 terms are exact in float64 and are summed
there (on CPU in cache-sized tiles, so no full-size float64 copy is made), then rounded
once to the input dtype; float64 input is summed by error-free splitting.

References
----------
.. [1] A. Neumaier, "Rundungsfehleranalyse einiger Verfahren zur Summation endlicher
   Summen", ZAMM 54(1), 1974.
.. [2] T. Ogita, S. M. Rump, S. Oishi, "Accurate sum and dot product", SIAM J. Sci.
   Comput. 26(6), 2005 (TwoSum, Sum2 and its error bound).
.. [3] S. M. Rump, T. Ogita, S. Oishi, "Accurate floating-point summation part I:
   faithful rounding", SIAM J. Sci. Comput. 31(1), 2008 (error-free vector splitting).
.. [4] T. F. Chan, G. H. Golub, R. J. LeVeque, "Algorithms for computing the sample
   variance: analysis and recommendations", The American Statistician 37(3), 1983.
.. [5] J. L. Blue, "A portable Fortran program to find the Euclidean norm of a vector",
   ACM TOMS 4(1), 1978 (scaling before squaring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from finite.ops._rows import as_rows, check_reduction_args, from_rows, kept_shape, row_blocks

__all__ = ["compensated_sum", "l2_norm", "mean_var"]

# On CPU the split runs over tiles of about 2**19 elements (4 MiB in float64): its seven
# passes over a tile then mostly hit the cache, and only the first reads main memory.
_CPU_TILE_ELEMENTS = 1 << 19
# On CPU narrower terms are widened to float64 in tiles of this many elements (8 MiB): a
# float64 reduction over a float32 tensor would first convert all of it. Larger tiles
# fall out of the cache (and, past 32 MiB, are mapped afresh by every call); smaller ones
# multiply the parallel regions, which stall when the machine's cores are busy.
_CPU_WIDEN_ELEMENTS = 1 << 20
# Chunks of at most this many elements share one splitting unit (see _split_tile).
_MAX_CHUNK = 256


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


def _times_pow2(t: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``t * 2**exponent``, exact unless the result itself over- or underflows.

    The factor is applied in two halves: ``2**exponent`` alone may not be representable
    (float32 results near 1e-45 need factors up to 2**275).
    """
    half = torch.div(exponent, 2, rounding_mode="floor")
    return t * torch.exp2(half.to(t.dtype)) * torch.exp2((exponent - half).to(t.dtype))


def _largest_exponent(dtype: torch.dtype) -> int:
    """The exponent of the largest finite value: 127 for float32, 1023 for float64."""
    return math.frexp(torch.finfo(dtype).max)[1] - 1


def _precision(dtype: torch.dtype) -> int:
    """Significand bits, the implicit one included: 24 for float32, 53 for float64."""
    return 2 - math.frexp(torch.finfo(dtype).eps)[1]


def _exponent(magnitude: torch.Tensor) -> torch.Tensor:
    """The integer ``e`` with ``2**(e-1) <= magnitude < 2**e`` (0 for 0, inf and NaN)."""
    return torch.frexp(magnitude).exponent


# --------------------------------------------------------------------------------------
# Compensated sum
# --------------------------------------------------------------------------------------


def _two_sum_tree(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the last dim pairwise; return the float sum and the sum of its rounding errors.

    Each pairwise addition ``s = a + b`` is followed by Knuth's TwoSum, which recovers its
    rounding error ``(a + b) - s`` exactly whatever the magnitudes (the branch-free form
    of Neumaier's correction). The errors are added up along the same tree.
    """
    width = 1 << (values.shape[-1] - 1).bit_length()
    values = F.pad(values, (0, width - values.shape[-1]))
    errors = torch.zeros_like(values)
    while width > 1:
        width //= 2
        a, b = values[..., :width], values[..., width:]
        total = a + b
        b_part = total - a
        error = (a - (total - b_part)) + (b - b_part)
        errors = errors[..., :width] + errors[..., width:] + error
        values = total
    return values[..., 0], errors[..., 0]


def _split_tile(
    chunks: torch.Tensor,
    scaled: torch.Tensor,
    rounded: torch.Tensor,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Error-free split of each chunk (last dim) into a high part with an exact sum.

    With ``2**(e-1) <= max|x| < 2**e`` in the chunk, ``n <= 2**m`` elements and ``p``
    significand bits, every ``x`` is scaled by ``2**k``, ``k = p - m - e`` (exact), and
    split into ``round(x * 2**k)``, an integer of at most ``p - m`` bits, and the rest,
    of magnitude at most 1/2 (exact: a difference below one unit of the scaled ``x``).
    The integers of a chunk add up to at most ``2**p``, so their float sum is exact in
    any order. Writes the sum of the integers, the (rounded) sum of the rests and ``e``
    into ``out``; :func:`_scale_exponent` gives ``k`` from ``e``.
    """
    high, low, exponent = out
    magnitude = torch.maximum(chunks.amax(-1, keepdim=True), chunks.amin(-1, keepdim=True).neg_())
    torch.frexp(magnitude, out=(magnitude, exponent.unsqueeze(-1)))
    k = _scale_exponent(exponent.unsqueeze(-1), bits, scaled.dtype)
    torch.mul(chunks, torch.exp2(k.to(scaled.dtype)), out=scaled)
    torch.round(scaled, out=rounded)
    torch.sum(rounded, -1, out=high)
    torch.sum(scaled.sub_(rounded), -1, out=low)


def _scale_exponent(exponent: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``k = p - m - e`` of :func:`_split_tile`, at most the largest exponent of ``dtype``.

    Chunks below ``2**(p - m - largest)`` are put on the fixed grid ``2**-largest``
    instead: their integer parts stay exact and ``2**k`` stays representable.
    """
    return (_precision(dtype) - bits - exponent).clamp_(max=_largest_exponent(dtype))


def _chunk_sums(
    x2: torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row and chunk of ``length`` columns of ``x2``, :func:`_split_tile`'s sums of
    integers and of rests, ``k`` and the chunk's magnitude exponent ``e``."""
    rows, cols = x2.shape
    count = cols // length
    chunks = x2[:, : count * length].view(rows, count, length)
    bits = (length - 1).bit_length()
    if x2.device.type != "cpu" or torch.compiler.is_compiling():
        row_step, chunk_step = max(rows, 1), max(count, 1)
    else:
        row_step = max(1, _CPU_TILE_ELEMENTS // max(cols, 1))
        chunk_step = count if row_step > 1 else max(1, _CPU_TILE_ELEMENTS // length)
    tile_shape = (min(row_step, rows), min(chunk_step, count), length)
    scaled = torch.empty(tile_shape, dtype=dtype, device=x2.device)
    rounded = torch.empty_like(scaled)
    high = torch.empty(rows, count, dtype=dtype, device=x2.device)
    low = torch.empty_like(high)
    exponent = torch.empty(rows, count, dtype=torch.int32, device=x2.device)
    # A tile is whole rows or part of one row, so its slices of the outputs are contiguous.
    for r in range(0, rows, row_step):
        for c in range(0, count, chunk_step):
            tile = chunks[r : r + row_step, c : c + chunk_step]
            n_rows, n_chunks = tile.shape[:2]
            outputs = [t[r : r + n_rows, c : c + n_chunks] for t in (high, low, exponent)]
            _split_tile(
                tile, scaled[:n_rows, :n_chunks], rounded[:n_rows, :n_chunks], bits, outputs
            )
    return high, low, _scale_exponent(exponent, bits, dtype), exponent


def _split_sum_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compensated sum of each row of the 2-d float64 ``x2``, as ``hi + lo``.

    ``hi`` is the sum rounded once; ``lo`` the rounded remainder (0 where ``hi`` is not
    finite), so that ``hi + lo`` carries the sum to about twice the precision.
    """
    dtype = x2.dtype
    rows, cols = x2.shape
    if cols == 0:
        zeros = torch.zeros(rows, dtype=dtype, device=x2.device)
        return zeros, zeros
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    # Chunks of about sqrt(n) elements balance the two second-order error terms
    # (n_chunk**3 and n * n_chunk, see compensated_sum).
    length = min(_MAX_CHUNK, 1 << ((cols.bit_length() - 1) // 2))
    parts = [_chunk_sums(x2, length, dtype)]
    tail = cols % length
    if tail:
        parts.append(_chunk_sums(x2[:, cols - tail :], tail, dtype))
    high, low, k, top_exponent = [torch.cat(p, dim=1) for p in zip(*parts, strict=True)]
    # Scale every row by 2**-shift so that its partial sums (at most cols * 2**e_max)
    # cannot overflow even where the exact sum is finite; undone at the end.
    top_exponent = top_exponent.amax(dim=1)
    shift = (top_exponent + cols.bit_length() + 1 - _largest_exponent(dtype)).clamp_(min=0)
    to_row_scale = (-k - shift[:, None]).to(torch.int32)
    total, errors = _two_sum_tree(_times_pow2(high, to_row_scale))
    errors = errors + _times_pow2(low, to_row_scale).sum(dim=1)
    # TwoSum of the total and its correction. An inf or NaN entry makes the float total
    # inf or NaN, as in torch.sum; its error terms are then NaN (inf - inf) and must not
    # leak in.
    finite = total.isfinite()
    hi = torch.where(finite, total + errors, total)
    b_virtual = hi - total
    lo = torch.where(finite, (total - (hi - b_virtual)) + (errors - b_virtual), 0)
    return _times_pow2(hi, shift), _times_pow2(lo, shift)


def _widened_sum_rows(x2: torch.Tensor) -> torch.Tensor:
    """The sum of each row of a float32/float16/bfloat16 matrix, accumulated in float64.

    Every term is exact in float64 and no sum of them can overflow there, so the error
    is that of a float64 sum, at most about ``(n - 1) * 2**-53 * sum|x|``. On CPU the
    terms are widened tile by tile into one reused buffer; elsewhere (and under
    compilation) the reduction converts as it reads.
    """
    rows, cols = x2.shape
    if x2.device.type != "cpu" or torch.compiler.is_compiling():
        return x2.sum(dim=-1, dtype=torch.float64)
    col_step = max(1, min(cols, _CPU_WIDEN_ELEMENTS))
    blocks = row_blocks(rows, col_step, x2.device, cpu_elements=_CPU_WIDEN_ELEMENTS)
    step = blocks[0].stop - blocks[0].start if blocks else 0
    wide = torch.empty(step, col_step, dtype=torch.float64)
    # float16 converts to float64 on a slow path on CPU; through float32 it does not.
    staging = torch.empty(step, col_step) if x2.dtype == torch.float16 else None
    total = torch.zeros(rows, dtype=torch.float64)
    for block in blocks:
        for c in range(0, cols, col_step):
            tile = x2[block, c : c + col_step]
            shape = tile.shape
            if staging is not None:
                tile = staging[: shape[0], : shape[1]].copy_(tile)
            total[block] += wide[: shape[0], : shape[1]].copy_(tile).sum(dim=-1)
    return total


def _sum_rows(x2: torch.Tensor) -> torch.Tensor:
    """The compensated sum of each row of the 2-d ``x2``, in float64."""
    if x2.dtype == torch.float64:
        return _split_sum_rows(x2)[0]
    return _widened_sum_rows(x2)


def _sum(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """Compensated sum over ``dims``, in float64, without autograd."""
    return _sum_rows(as_rows(x, dims)).reshape(kept_shape(x.shape, dims, keepdim))


class _CompensatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dims, keepdim):
        ctx.shape, ctx.dims, ctx.keepdim = x.shape, dims, keepdim
        return _sum(x, dims, keepdim).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.keepdim:
            grad = grad.reshape(kept_shape(ctx.shape, ctx.dims, True))
        return grad.expand(ctx.shape), None, None


def compensated_sum(
    x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False
) -> torch.Tensor:
    """Sum over ``dim`` as accurately as if it were carried in twice the precision.

    A drop-in for :func:`torch.sum` for sums whose terms cancel or span many orders of
    magnitude: ``compensated_sum(torch.tensor([1e8, 1.0, -1e8]))`` is 1, ``torch.sum``
    gives 0.

    float32, float16 and bfloat16 terms are exact in float64 and are summed there, then
    rounded once to the input dtype. float64 terms have no wider type: each run of about
    ``sqrt(n)`` (at most 256) elements is split without error into integers times a
    power of two, whose sum is exact, and small remainders (Rump, Ogita & Oishi's
    error-free vector transformation); the exact chunk sums are added with TwoSum, which
    recovers every rounding error (Neumaier's correction, branch-free), and the errors
    and remainders are added to the result, rounded once. Both are vectorised: a few
    fused passes over the data, no loop over elements.

    Parameters
    ----------
    x : Tensor
        Real floating-point input.
    dim : int, sequence of int or None, default None
        Dimension(s) to reduce; ``None`` reduces all of them.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.

    Returns
    -------
    Tensor
        In the dtype of ``x``. With ``u`` the unit roundoff of the compute dtype (2**-24
        for float32, float16 and bfloat16, 2**-53 for float64), ``s`` the exact sum of
        ``n`` terms and chunks of ``c <= sqrt(n)`` elements, the result before the final
        rounding to a low-precision dtype is within
        ``u*|s| + (c**3 + 2*n*c + log2(n)**2) * u**2 * sum|x|`` of ``s``, below the
        Sum2 bound ``u*|s| + ((n-1)*u)**2 * sum|x|`` of Ogita, Rump & Oishi for
        ``n >= 16`` (barring underflow). For float32, float16 and bfloat16 input the
        float64 sum errs by at most ``(n-1) * 2**-53 * sum|x|`` before that rounding, 32
        times inside the second term: in practice the result is correctly rounded, but
        a term more than about 2**29 times smaller than terms that cancel can be lost
        (``[1e30, 1, -1e30]`` gives 0, within the bound). Partial sums never overflow
        where the exact sum is finite (float64 rows are scaled by a power of two when
        needed). An inf or NaN entry gives what :func:`torch.sum` gives (``inf + -inf``
        is NaN). An empty reduction gives 0. The gradient is 1 for every entry, as for
        :func:`torch.sum`.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor, or ``dim`` or ``keepdim`` has the
        wrong type.
    ValueError
        If ``dim`` is out of range, repeated or ``()``.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import compensated_sum
    >>> x = torch.tensor([1e8, 1.0, -1e8])
    >>> compensated_sum(x), x.sum()
    (tensor(1.), tensor(0.))
    >>> compensated_sum(torch.tensor([3e38, 3e38, -3e38, -3e38]))  # torch.sum: inf
    tensor(0.)

    Notes
    -----
    On CPU the float64 accumulation converts the terms tile by tile (a float64
    :func:`torch.sum` of a float32 tensor would first convert all of it), a few times
    the cost of :func:`torch.sum`; on CUDA the reduction converts as it reads. The
    float64 split costs seven elementwise or reduction passes over the data, tiled on
    CPU so that mostly only the first reads main memory. A reduction over dimensions
    that are not the trailing ones (or not contiguous) is run on a contiguous copy.

    References
    ----------
    Neumaier (1974); Ogita, Rump & Oishi (2005); Rump, Ogita & Oishi (2008).
    """
    x, dims = check_reduction_args(x, dim, keepdim)
    return _CompensatedSum.apply(x, dims, keepdim)


# --------------------------------------------------------------------------------------
# Mean and variance
# --------------------------------------------------------------------------------------


# Veltkamp's splitting constant for float64: 2**27 + 1.
_SPLITTER = 134217729.0


def _two_product(a: torch.Tensor, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dekker's exact product: ``a * b = p + e`` in float64, ``p`` the rounded product
    (both factors split into halves of at most 26 bits, whose products are exact)."""
    p = a * b
    scaled = a * _SPLITTER
    a_hi = scaled - (scaled - a)
    a_lo = a - a_hi
    b_scaled = b * _SPLITTER
    b_hi = b_scaled - (b_scaled - b)
    b_lo = b - b_hi
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _row_means(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of each row as ``hi + lo`` (float64); ``lo`` is 0 unless ``x2`` is float64.

    float32, float16 and bfloat16 rows: their float64 sum divided by n, within about
    2**-52 relative. float64 rows: the double-word compensated sum ``s_hi + s_lo`` and
    ``hi = s_hi / n``, ``lo = (s_hi - hi * n + s_lo) / n`` with ``hi * n`` exact
    (Dekker), so ``x - hi - lo`` keeps its digits where ``x`` is close to the mean. A
    constant row gets its value exactly (``n * c / n`` need not round back to ``c``).
    """
    count = x2.shape[1]
    if x2.dtype == torch.float64:
        sum_hi, sum_lo = _split_sum_rows(x2)
        hi = sum_hi / count
        product, product_error = _two_product(hi, float(count))
        # sum_hi - product is exact: the two are within an ulp of each other.
        lo = (((sum_hi - product) - product_error) + sum_lo) / count
        lo = torch.where(hi.isfinite(), lo, 0)
    else:
        hi = _widened_sum_rows(x2) / count
        lo = torch.zeros_like(hi)
    if count > 0:
        low = x2.amin(dim=-1)
        constant = low == x2.amax(dim=-1)
        hi = torch.where(constant, low.to(hi.dtype), hi)
        lo = torch.where(constant, 0, lo)
    return hi, lo


def _deviations(x2: torch.Tensor, mean_hi: torch.Tensor, mean_lo: torch.Tensor) -> torch.Tensor:
    """``x - mean`` per row, float64: exact terms minus the float64 mean for narrower
    input, ``(x - hi) - lo`` for float64 input."""
    deviation = x2.to(torch.float64) - mean_hi[:, None]
    if x2.dtype == torch.float64:
        deviation.sub_(mean_lo[:, None])
    return deviation


class _MeanVar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dims, keepdim, correction):
        x2 = as_rows(x, dims)
        count = x2.shape[1]
        mean_hi, mean_lo = _row_means(x2)
        deviation = _deviations(x2, mean_hi, mean_lo)
        if x.dtype == torch.float64:
            first = _split_sum_rows(deviation)[0]
            second = _split_sum_rows(deviation.square_())[0]
        else:
            # Exact terms and float64 sums: errors far below an ulp of the input dtype.
            first = deviation.sum(dim=-1)
            second = deviation.square_().sum(dim=-1)
        # Cauchy-Schwarz makes the difference >= 0; the clamp removes a last rounding
        # below 0.
        var = ((second - first * first / count) / max(count - correction, 0)).clamp(min=0)
        ctx.dims, ctx.correction = dims, correction
        ctx.save_for_backward(x, mean_hi, mean_lo)
        shape = kept_shape(x.shape, dims, keepdim)
        mean = (mean_hi + mean_lo).to(x.dtype).reshape(shape)
        return mean, var.to(x.dtype).reshape(shape)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean_hi, mean_lo = ctx.saved_tensors
        x2 = as_rows(x, ctx.dims)
        count = x2.shape[1]
        # d mean / dx = 1 / n, d var / dx = 2 (x - mean) / (n - correction): the sum of
        # the deviations is 0, so the mean's dependence on x drops out. The deviation
        # is computed as accurately as the variance itself, and rounded once.
        denominator = count - ctx.correction
        factor = 2 / denominator if denominator > 0 else math.inf  # as the variance
        scale = grad_var.reshape(-1, 1).to(torch.float64) * factor
        offset = grad_mean.reshape(-1, 1).to(torch.float64) / count
        grad2 = _deviations(x2, mean_hi, mean_lo).mul_(scale).add_(offset)
        return from_rows(grad2, x.shape, ctx.dims).to(x.dtype), None, None, None


def mean_var(
    x: torch.Tensor,
    dim: int | Sequence[int] | None,
    keepdim: bool = False,
    *,
    correction: float = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over ``dim`` by the corrected two-pass algorithm.

    ``m = sum(x) / n``, ``d = x - m``, ``var = (sum(d**2) - sum(d)**2 / n) / (n -
    correction)``, every sum compensated (:func:`compensated_sum`). The subtracted term
    cancels the first-order effect of the rounding of ``m`` (Chan, Golub & LeVeque).
    Unlike ``E[x**2] - E[x]**2`` nothing large cancels, so values like ``1e4 + noise``
    in float32 keep their variance instead of returning 0 or a negative number.
    float32, float16 and bfloat16 input is computed in float64 (``d`` is then accurate
    to far below an ulp of the input dtype) and rounded once; float64 input carries
    ``m`` as an unevaluated sum ``hi + lo`` and takes ``d = (x - hi) - lo``.

    Parameters
    ----------
    x : Tensor
        Real floating-point input.
    dim : int, sequence of int or None
        Dimension(s) to reduce; ``None`` reduces all of them.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.
    correction : int or float, default 0
        Subtracted from the number of elements in the divisor: 0 is the population
        variance, 1 Bessel's correction (:func:`torch.var_mean`'s default).

    Returns
    -------
    (Tensor, Tensor)
        ``(mean, var)`` in the dtype of ``x`` -- note the order: :func:`torch.var_mean`
        returns ``(var, mean)``. ``var >= 0`` always, and a slice of equal finite
        values gives exactly that value and variance 0. As in PyTorch, ``n -
        correction <= 0`` gives ``inf`` (NaN for a zero sum of squares), an empty slice
        gives NaN, and inf or NaN entries give NaN variance. The gradients are ``1 / n``
        for the mean and ``2 (x - m) / (n - correction)`` for the variance, with
        ``x - m`` formed as in the forward pass: where ``x`` is close to the mean, the
        naive ``x - round(m)`` would be mostly the rounding error of ``m``. The input
        is saved for the backward pass (as for ``torch.var_mean``), plus two float64
        numbers per slice.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor, ``dim`` or ``keepdim`` has the
        wrong type, or ``correction`` is not a real number.
    ValueError
        If ``dim`` is out of range, repeated or ``()``, or ``correction`` is negative
        or not finite.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import mean_var
    >>> x = 1e4 + 1e-2 * torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    >>> mean_var(x, 0)  # (x * x).mean() - x.mean() ** 2 gives 8.0
    (tensor(10000.), tensor(0.0001))

    References
    ----------
    Chan, Golub & LeVeque (1983).
    """
    x, dims = check_reduction_args(x, dim, keepdim)
    if isinstance(correction, bool) or not isinstance(correction, (int, float)):
        raise TypeError(f"correction must be an int or float, got {type(correction).__name__}")
    if not (math.isfinite(correction) and correction >= 0):
        raise ValueError(f"correction must be finite and >= 0, got {correction!r}")
    return _MeanVar.apply(x, dims, keepdim, float(correction))


# --------------------------------------------------------------------------------------
# Euclidean norm
# --------------------------------------------------------------------------------------


class _L2Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dims, keepdim):
        # float64 for every input: the squares of float32 (and narrower) values are exact
        # there, so their norms come out correctly rounded but for a rare double rounding.
        dtype = torch.float64
        magnitude = torch.maximum(x.amax(dims, keepdim=True), x.amin(dims, keepdim=True).neg()).to(
            dtype
        )
        # y = x * 2**-e has |y| < 1 with its largest entry >= 1/2: sum(y**2) lies in
        # [1/4, n], so it neither overflows nor loses the large terms to underflow.
        # The exponent stays <= the largest one representable (tiny inputs simply keep
        # |y| < 1/2); inf and NaN get exponent 0 and pass through unscaled.
        scale_exponent = (-_exponent(magnitude)).clamp_(max=_largest_exponent(dtype))
        y = x.to(dtype) * torch.exp2(scale_exponent.to(dtype))
        scaled_norm = _sum(y * y, dims, keepdim=True).sqrt_()
        ctx.dims, ctx.keepdim = dims, keepdim
        ctx.save_for_backward(x, scale_exponent, scaled_norm)
        norm = _times_pow2(scaled_norm, -scale_exponent).to(x.dtype)
        return norm if keepdim else norm.reshape(kept_shape(x.shape, dims, False))

    @staticmethod
    def backward(ctx, grad):
        x, scale_exponent, scaled_norm = ctx.saved_tensors
        dtype = scaled_norm.dtype
        if not ctx.keepdim:
            grad = grad.reshape(scaled_norm.shape)
        # d|x|/dx = x / |x| = y / |y| in the scaled variables, where nothing overflows.
        y = x.to(dtype) * torch.exp2(scale_exponent.to(dtype))
        direction = y / scaled_norm
        # Zero vector: the subgradient 0. An infinite entry: |x| -> inf along the
        # direction in which the k infinite entries grow alike, sign(x_i) / sqrt(k) for
        # them and 0 for the finite ones.
        direction = torch.where(scaled_norm == 0, 0, direction)
        infinite = y.isinf()
        inf_count = infinite.sum(ctx.dims, keepdim=True).to(dtype)
        direction = torch.where(
            scaled_norm.isinf(), torch.where(infinite, y.sign() / inf_count.sqrt(), 0), direction
        )
        return (grad.to(dtype) * direction).to(x.dtype), None, None


def l2_norm(
    x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False
) -> torch.Tensor:
    """Euclidean norm over ``dim`` without overflow or underflow in the squares.

    The slice is scaled by a power of two ``2**-e`` (exact) with ``e`` the exponent of
    its largest magnitude, the squares are added with :func:`compensated_sum`, and the
    square root is scaled back (Blue's idea, with an exact scale). ``x**2`` never forms
    in the input's range: float16 values near 65504, float32 ones near 1e38 and
    subnormals all give their norm, where ``sqrt(sum(x**2))`` gives inf or 0.

    Parameters
    ----------
    x : Tensor
        Real floating-point input.
    dim : int, sequence of int or None, default None
        Dimension(s) to reduce; ``None`` reduces all of them.
    keepdim : bool, default False
        Keep the reduced dimensions with size 1.

    Returns
    -------
    Tensor
        In the dtype of ``x``: the norm computed in float64 and rounded once. For
        float32, bfloat16 and float16 input the squares are exact in float64, so the
        result is the correctly rounded norm (up to a rare double rounding, half a unit
        more); for float64 input the relative error is at most about 1.5 units of
        roundoff. A norm above the dtype's largest value (e.g. 65504 for float16) is inf:
        the correctly computed norm, rounded. inf entries give inf, NaN propagates, an
        empty slice gives 0.

    Notes
    -----
    The gradient ``x / |x|`` is computed from the scaled ``y / |y|``, so it is finite
    for every finite input. Decided edges: the zero vector has gradient 0 (a
    subgradient); a slice with ``k`` infinite entries has gradient ``sign(x_i)/sqrt(k)``
    at them and 0 elsewhere (the limit as they grow together); NaN gives NaN.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor, or ``dim`` or ``keepdim`` has the
        wrong type.
    ValueError
        If ``dim`` is out of range, repeated or ``()``.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import l2_norm
    >>> l2_norm(torch.tensor([3e30, 4e30]))  # torch.linalg.vector_norm: inf
    tensor(5.0000e+30)
    >>> l2_norm(torch.tensor([6000.0, 8000.0], dtype=torch.float16))  # squares overflow
    tensor(10000., dtype=torch.float16)

    References
    ----------
    Blue (1978).
    """
    x, dims = check_reduction_args(x, dim, keepdim)
    if math.prod([x.shape[d] for d in dims]) == 0:
        return torch.zeros(kept_shape(x.shape, dims, keepdim), dtype=x.dtype, device=x.device)
    return _L2Norm.apply(x, dims, keepdim)
