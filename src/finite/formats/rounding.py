"""Rounding a tensor to the values of a floating-point format, with or without a torch dtype."""

from __future__ import annotations

import math

import torch

from finite._checks import require_choice, require_float_tensor
from finite.formats.float_format import FloatFormat, get_format

ROUNDING_MODES = ("nearest", "stochastic")

# Input dtype -> (integer dtype of the same width, stored mantissa bits).
_BIT_LAYOUT = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52)}

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
        ``generator``, so a seeded generator reproduces the result.

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
