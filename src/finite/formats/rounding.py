"""Rounding a tensor to the values of a floating-point format, with or without a torch dtype.

:func:`round_to` rounds to any format and keeps the input's dtype; :func:`stochastic_round`
is its fast path for the common case of mixed-precision training, float32 to a
bfloat16/float16 tensor, and the one stochastic rounding the optimizers use.
"""

from __future__ import annotations

import math

import torch

from finite._checks import require_choice, require_float_tensor
from finite.formats.float_format import FloatFormat, get_format

__all__ = ["ROUNDING_MODES", "round_to", "stochastic_round"]

ROUNDING_MODES = ("nearest", "stochastic")

# Input dtype -> (integer dtype of the same width, stored mantissa bits).
_BIT_LAYOUT = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52)}

# stochastic_round's targets -> their stored mantissa bits.
_SIXTEEN_BIT = {torch.bfloat16: 7, torch.float16: 10}
_FLOAT32_MANTISSA_BITS = 23

# Largest power-of-two step used to rescale a tensor: 2**60 is a normal float32 and so are
# the partial products, so every step is exact.
_MAX_SCALE_STEP_BITS = 60


def round_to(
    x: torch.Tensor,
    fmt: str | torch.dtype | FloatFormat,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` to the values representable in ``fmt``, keeping ``x``'s dtype.

    The rounding is done by integer and power-of-two arithmetic on ``x`` itself, never
    by a cast, so it works for formats torch has no dtype for (``tfloat32``) and
    rounds once: for float64 input it is the correctly rounded value, whereas torch's
    ``x.to(float16)`` from float64 goes through float32 and can round twice.

    ``"nearest"``
        Round to nearest, ties to even, subnormals included. Results beyond
        ``fmt.max`` overflow as the format does: to ``±inf`` in formats with
        infinities; formats without (float8_e4m3fn) saturate to ``±fmt.max``, and map
        ``±inf`` to ``±fmt.max`` too, as PyTorch's cast and the OCP FP8 saturating
        conversion do. Same results, bit for bit, as ``x.to(fmt.torch_dtype)`` for
        float32 input (PyTorch releases before its saturating float8_e4m3fn cast,
        2.11 for one, turn that overflow into NaN instead).
    ``"stochastic"``
        A finite ``x`` with ``|x| <= fmt.max`` between neighbours ``lo < x < hi`` of
        ``fmt`` becomes ``hi`` with probability ``(x - lo) / (hi - lo)`` and ``lo``
        otherwise, so ``E[round_to(x)] = x``; representable values stay put. The
        probability is exact above ``fmt.min_normal`` and resolved to ``2**-24``
        (float32 input) or ``2**-53`` (float64) of the spacing below it. Values beyond
        ``fmt.max`` (and ``±inf``) round to nearest, so stochastic rounding never
        overflows where round-to-nearest would not. One random draw per element from
        ``generator``, so a seeded generator reproduces the result. float32 input
        rounded to bfloat16/float16 goes through :func:`stochastic_round`.

    NaN stays NaN and the sign of zero is kept. The result is detached from autograd:
    rounding has zero derivative almost everywhere (use ``x + (round_to(x, fmt) -
    x).detach()`` for a straight-through estimate). No host synchronisation.

    Parameters
    ----------
    x : torch.Tensor
        float32 or float64 tensor, on any device. Upcast float16/bfloat16/fp8 tensors
        first (``x.float()`` is exact): rounding to ``fmt`` and back to a 16-bit dtype
        would round a second time.
    fmt : str, torch.dtype or FloatFormat
        The target format, anything :func:`get_format` accepts.
    mode : {"nearest", "stochastic"}
    generator : torch.Generator, optional
        Source of randomness for ``"stochastic"``, on ``x.device``; ignored for
        ``"nearest"``.

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as ``x``.

    Raises
    ------
    TypeError
        If ``x`` is not a float32 or float64 tensor, or ``fmt`` has the wrong type.
    ValueError
        If ``fmt`` is not a known format or ``mode`` is not a rounding mode.

    Examples
    --------
    >>> round_to(torch.tensor([1.0 + 2**-9, 70000.0]), "bf16")
    tensor([1.0000e+00, 7.0144e+04])
    >>> round_to(torch.tensor([500.0, -float("inf")]), "fp8_e4m3")
    tensor([ 448., -448.])

    References
    ----------
    .. [1] IEEE 754-2019, Standard for Floating-Point Arithmetic, sec. 4.3 and 7.4.
    .. [2] P. Micikevicius et al., "OCP 8-bit Floating Point Specification (OFP8)",
       rev. 1.0, 2023 (saturating conversion).
    .. [3] S. Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015
       (stochastic rounding).
    """
    x = require_float_tensor(x, "x")
    if x.dtype not in _BIT_LAYOUT:
        raise TypeError(
            f"x must be a float32 or float64 tensor, got dtype {x.dtype}; upcast it with "
            "x.float() (exact) and round the result"
        )
    fmt = get_format(fmt)
    require_choice(mode, ROUNDING_MODES, "mode")
    x = x.detach()
    if mode == "stochastic" and x.dtype == torch.float32 and fmt.torch_dtype in _SIXTEEN_BIT:
        # Same distribution, in fewer passes over memory; rounding back up is exact.
        return stochastic_round(x, fmt.torch_dtype, generator).to(torch.float32)
    magnitude = x.abs().nan_to_num(nan=0.0, posinf=math.inf)
    rounded = _apply_range(_round_magnitude(magnitude, fmt, mode, generator), fmt)
    return torch.where(x.isnan(), x, rounded.copysign(x))


def _round_magnitude(
    magnitude: torch.Tensor, fmt: FloatFormat, mode: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Round non-negative, non-NaN ``magnitude`` to ``fmt``'s grid, exponent range unbounded.

    Values may come out above ``fmt.max`` (that is the overflow test); ``+inf`` stays
    ``+inf``. Values beyond ``fmt.max`` round to nearest in both modes.
    """
    dtype = magnitude.dtype
    int_dtype, input_mantissa_bits = _BIT_LAYOUT[dtype]
    stochastic = mode == "stochastic"
    if stochastic:
        # One draw serves both ranges below: its low bits as integer noise above
        # min_normal, all of it as a uniform fraction below.
        random_bits = input_mantissa_bits + 1
        noise = torch.randint(
            0,
            2**random_bits,
            magnitude.shape,
            dtype=int_dtype,
            device=magnitude.device,
            generator=generator,
        )

    # Normal range: fmt keeps the leading fmt.mantissa_bits of x's mantissa. On the bit
    # pattern of a non-negative float, adding below the kept bits and truncating them is
    # rounding; a carry out of the mantissa moves to the next binade, which is right.
    dropped_bits = input_mantissa_bits - fmt.mantissa_bits
    if dropped_bits > 0:
        bits = magnitude.view(int_dtype)
        low_mask = (1 << dropped_bits) - 1
        # Half an ulp minus one, plus the kept last bit: exact ties round to even.
        increment = (low_mask >> 1) + ((bits >> dropped_bits) & 1)
        if stochastic:
            # Adding uniform noise below the kept bits carries into them with
            # probability (dropped part) / ulp, exactly.
            increment = torch.where(magnitude <= fmt.max, noise & low_mask, increment)
        rounded = (bits + increment).bitwise_and_(~low_mask).view(dtype)
    else:
        rounded = magnitude

    # Subnormal range: a fixed grid of spacing fmt.min_subnormal, which the bit trick
    # (a fixed number of significant bits) does not follow. Skipped when x's dtype has no
    # value off that grid.
    input_min_subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    if fmt.min_subnormal <= input_min_subnormal:
        return rounded
    spacing_exponent = math.frexp(fmt.min_subnormal)[1] - 1
    # Exact: a power-of-two rescale whose result stays below 2**mantissa_bits.
    steps = _mul_power_of_two(magnitude, -spacing_exponent)
    if stochastic:
        whole_steps = steps.floor()
        uniform = noise.to(dtype).mul_(2.0**-random_bits)
        steps = whole_steps.add_(uniform < steps - whole_steps)
    else:
        steps = steps.round()  # half to even
    subnormal = _mul_power_of_two(steps, spacing_exponent)
    return torch.where(magnitude < fmt.min_normal, subnormal, rounded)


def _apply_range(rounded: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Overflow magnitudes above ``fmt.max`` to inf, or saturate them without inf."""
    overflow_value = math.inf if fmt.has_inf else fmt.max
    return rounded.masked_fill(rounded > fmt.max, overflow_value)


def _mul_power_of_two(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """``x * 2**exponent`` in steps whose factors are normal in x's dtype.

    One factor such as ``2**133`` overflows float32, and CUDA divides by a scalar by
    multiplying with its reciprocal, so neither one multiply nor a division is safe.
    """
    while exponent != 0:
        step = max(-_MAX_SCALE_STEP_BITS, min(_MAX_SCALE_STEP_BITS, exponent))
        x = x * 2.0**step
        exponent -= step
    return x


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round a float32 tensor stochastically to a bfloat16 or float16 tensor, unbiased.

    The distribution is that of ``round_to(x, dtype, "stochastic")``, which calls this
    function for float32 input: a finite ``x`` with ``|x| <= finfo(dtype).max`` between
    neighbours ``lo < x < hi`` of ``dtype`` becomes ``hi`` with probability
    ``(x - lo) / (hi - lo)``, exactly (float16 subnormals: to ``2**-24`` of their
    spacing), so ``E[stochastic_round(x)] = x``. Values beyond the largest finite value,
    ``±inf`` and NaN round to nearest, as ``x.to(dtype)`` does; the sign of zero is kept.
    Returning ``dtype`` directly saves the write and re-read of a float32 result, which
    matters in an optimizer step that rounds every weight.

    How: float32 shares bfloat16's exponent layout and float16's above ``2**-14``, so
    there, adding uniform random bits below the target's last mantissa bit of the float32
    bit pattern and truncating them rounds up with exactly the right probability (a carry
    out of the dropped bits is the round-up; it moves into the exponent at a binade
    boundary, which is right too). float16 subnormals lie on a fixed grid of spacing
    ``2**-24`` that a fixed number of mantissa bits does not follow; they are rounded on
    that grid with a uniform fraction of 24 random bits.

    Parameters
    ----------
    x : torch.Tensor
        float32 tensor, on any device.
    dtype : torch.dtype
        ``torch.bfloat16`` or ``torch.float16``.
    generator : torch.Generator, optional
        Source of randomness, on ``x.device``; a seeded generator reproduces the result.
        One draw per element.

    Returns
    -------
    torch.Tensor
        ``x``'s shape, on ``x.device``, of ``dtype``; detached from autograd. No host
        synchronisation.

    Raises
    ------
    TypeError
        If ``x`` is not a float32 tensor or ``dtype`` is not bfloat16/float16.

    Examples
    --------
    >>> x = torch.full((10_000,), 1.0 + 2**-9)  # a quarter of the way to the next bf16
    >>> rounded = stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(0))
    >>> sorted(set(rounded.tolist()))
    [1.0, 1.0078125]

    References
    ----------
    .. [1] S. Gupta, A. Agrawal, K. Gopalakrishnan, P. Narayanan, "Deep Learning with
       Limited Numerical Precision", ICML 2015.
    """
    x = require_float_tensor(x, "x")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be a float32 tensor, got dtype {x.dtype}")
    if dtype not in _SIXTEEN_BIT:
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    x = x.detach()
    info = torch.finfo(dtype)
    dropped_bits = _FLOAT32_MANTISSA_BITS - _SIXTEEN_BIT[dtype]
    # float16's subnormals start above float32's smallest normal; bfloat16's do not.
    has_own_subnormals = info.tiny > torch.finfo(torch.float32).tiny
    random_bits = _FLOAT32_MANTISSA_BITS + 1 if has_own_subnormals else dropped_bits
    noise = torch.randint(
        0, 1 << random_bits, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    if has_own_subnormals:
        # On the grid, y = x / spacing becomes floor(y) + 1 with probability
        # y - floor(y), else floor(y); unbiased for negative y too. The scalings by powers
        # of two, floor and the fraction are exact, and the fraction times 2**24 is
        # compared with 24 random bits: the probability is resolved to 2**-24.
        spacing_bits = -math.frexp(info.tiny * info.eps)[1] + 1  # spacing = 2**-spacing_bits
        scaled = x * 2.0**spacing_bits
        subnormal = scaled.floor()
        fraction = scaled.sub_(subnormal).mul_(2.0**random_bits)
        subnormal.add_(noise < fraction)  # noise < 2**24 is exact in float32
        del scaled, fraction  # bounds the scratch memory to that of the normal path
        subnormal.mul_(2.0**-spacing_bits).copysign_(x)  # -0 and -tiny keep their "-"
        noise.bitwise_and_((1 << dropped_bits) - 1)
    # On the int32 view the sign bit sits apart from the magnitude bits, so the carry
    # rounds the magnitude up for either sign.
    rounded = noise.add_(x.view(torch.int32)).bitwise_and_(-(1 << dropped_bits))
    rounded = rounded.view(torch.float32)
    magnitude = x.abs()
    if has_own_subnormals:
        torch.where(magnitude < info.tiny, subnormal, rounded, out=rounded)
    # NaN fails the comparison and takes the round-to-nearest branch too.
    torch.where(magnitude <= info.max, rounded, x, out=rounded)
    return rounded.to(dtype)
