"""The floating-point formats of deep learning, derived from their bit layouts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch


@dataclass(frozen=True)
class FloatFormat:
    """What a binary floating-point format can hold.

    Every value is derived from the bit layout (sign bit, ``exponent_bits``,
    ``mantissa_bits``) with the IEEE 754 exponent bias ``2**(exponent_bits - 1) - 1``;
    none is typed in. Use :func:`get_format` to look one up.

    Attributes
    ----------
    name : str
        Canonical name, e.g. ``"bfloat16"`` (the torch dtype's name where there is one).
    torch_dtype : torch.dtype or None
        The matching torch dtype, ``None`` for formats torch cannot store (``tfloat32``).
    bits : int
        Significant bits of the encoding, ``1 + exponent_bits + mantissa_bits``
        (19 for ``tfloat32``, which sits in a 32-bit word).
    exponent_bits, mantissa_bits : int
        Widths of the exponent and of the stored (fraction) part of the significand.
    max : float
        Largest finite value.
    min_normal : float
        Smallest positive normal value, ``2**(1 - bias)``.
    min_subnormal : float
        Smallest positive subnormal value, ``min_normal * eps``.
    eps : float
        Distance from 1 to the next larger value, ``2**-mantissa_bits``.
    decimal_digits : float
        Decimal digits carried by the significand, ``(mantissa_bits + 1) * log10(2)``
        (7.22 for float32): two values closer than about ``10**-decimal_digits`` in
        relative terms may round to the same value.
    has_inf, has_nan : bool
        Whether the format encodes infinities and NaN.
    """

    name: str
    torch_dtype: torch.dtype | None
    bits: int
    exponent_bits: int
    mantissa_bits: int
    max: float
    min_normal: float
    min_subnormal: float
    eps: float
    decimal_digits: float
    has_inf: bool
    has_nan: bool


def _from_layout(
    name: str,
    torch_dtype: torch.dtype | None,
    exponent_bits: int,
    mantissa_bits: int,
    *,
    top_exponent_reserved: bool = True,
) -> FloatFormat:
    """Build a format from its layout.

    ``top_exponent_reserved=True`` is the IEEE 754 convention: the all-ones exponent
    encodes only inf and NaN. ``False`` is the OCP FP8 "fn" (finite) convention: the
    all-ones exponent holds normal values too and only the all-ones pattern is NaN, so
    there is no inf, one more binade, and the largest significand is one step below
    all-ones (float8_e4m3fn: ``1.75 * 2**8 = 448``).
    """
    bias = 2 ** (exponent_bits - 1) - 1
    eps = 2.0**-mantissa_bits
    if top_exponent_reserved:
        max_exponent = 2**exponent_bits - 2 - bias
        max_significand = 2.0 - eps
    else:
        max_exponent = 2**exponent_bits - 1 - bias
        max_significand = 2.0 - 2.0 * eps
    min_normal = 2.0 ** (1 - bias)
    return FloatFormat(
        name=name,
        torch_dtype=torch_dtype,
        bits=1 + exponent_bits + mantissa_bits,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        max=math.ldexp(max_significand, max_exponent),
        min_normal=min_normal,
        min_subnormal=min_normal * eps,
        eps=eps,
        decimal_digits=(mantissa_bits + 1) * math.log10(2.0),
        has_inf=top_exponent_reserved,
        has_nan=True,
    )


FORMATS: Mapping[str, FloatFormat] = MappingProxyType(
    {
        f.name: f
        for f in (
            _from_layout("float64", torch.float64, 11, 52),
            _from_layout("float32", torch.float32, 8, 23),
            # NVIDIA TensorFloat-32: float32's range with float16's precision.
            _from_layout("tfloat32", None, 8, 10),
            _from_layout("float16", torch.float16, 5, 10),
            _from_layout("bfloat16", torch.bfloat16, 8, 7),
            _from_layout("float8_e4m3fn", torch.float8_e4m3fn, 4, 3, top_exponent_reserved=False),
            _from_layout("float8_e5m2", torch.float8_e5m2, 5, 2),
        )
    }
)
"""The supported formats by canonical name, widest first."""

_ALIASES = {
    "float64": ("fp64", "double"),
    "float32": ("fp32", "float", "single"),
    "tfloat32": ("tf32",),
    "float16": ("fp16", "half"),
    "bfloat16": ("bf16",),
    "float8_e4m3fn": ("fp8_e4m3fn", "fp8_e4m3", "e4m3fn", "e4m3"),
    "float8_e5m2": ("fp8_e5m2", "e5m2"),
}
_BY_NAME = {
    alias: FORMATS[name] for name, aliases in _ALIASES.items() for alias in (name, *aliases)
}
_BY_DTYPE = {f.torch_dtype: f for f in FORMATS.values() if f.torch_dtype is not None}


def get_format(fmt: str | torch.dtype | FloatFormat) -> FloatFormat:
    """Look up a :class:`FloatFormat` by name or torch dtype.

    Parameters
    ----------
    fmt : str, torch.dtype or FloatFormat
        A name, case-insensitive, with ``-`` read as ``_`` and an optional ``torch.``
        prefix: ``float64``/``fp64``/``double``, ``float32``/``fp32``/``float``/``single``,
        ``tfloat32``/``tf32``, ``float16``/``fp16``/``half``, ``bfloat16``/``bf16``,
        ``float8_e4m3fn``/``fp8_e4m3fn``/``fp8_e4m3``/``e4m3fn``/``e4m3``,
        ``float8_e5m2``/``fp8_e5m2``/``e5m2``. A bare ``"fp8"`` is rejected as ambiguous
        (e4m3 usually holds weights and activations, e5m2 gradients). A torch dtype is
        looked up by identity; a ``FloatFormat`` is returned as is.

    Returns
    -------
    FloatFormat

    Raises
    ------
    TypeError
        If ``fmt`` is not a string, torch dtype or FloatFormat.
    ValueError
        If the name or dtype is not one of the supported formats (the message lists them).

    Examples
    --------
    >>> get_format("bf16").max
    3.3895313892515355e+38
    >>> get_format(torch.float8_e4m3fn).max
    448.0
    """
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        if fmt not in _BY_DTYPE:
            supported = ", ".join(str(dtype) for dtype in _BY_DTYPE)
            raise ValueError(f"fmt={fmt} is not a supported format; supported dtypes: {supported}")
        return _BY_DTYPE[fmt]
    if not isinstance(fmt, str):
        raise TypeError(
            f"fmt must be a format name, torch dtype or FloatFormat, got {type(fmt).__name__}"
        )
    key = fmt.strip().lower().replace("-", "_").removeprefix("torch.")
    if key in _BY_NAME:
        return _BY_NAME[key]
    hint = " ('fp8' is ambiguous: say fp8_e4m3 or fp8_e5m2)" if key == "fp8" else ""
    raise ValueError(
        f"unknown format fmt={fmt!r}{hint}; valid names: {', '.join(sorted(_BY_NAME))}"
    )
