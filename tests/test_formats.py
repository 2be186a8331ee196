import dataclasses
import math

import mpmath
import pytest
import torch

import finite
from finite.formats import FORMATS, FloatFormat, get_format

TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
NARROW_DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]

# (exponent bits, mantissa bits) as the specifications define them: IEEE 754 binary64,
# binary32 and binary16, Google bfloat16, NVIDIA TensorFloat-32, OCP OFP8 E4M3 and E5M2.
SPEC_LAYOUTS = {
    "float64": (11, 52),
    "float32": (8, 23),
    "tfloat32": (8, 10),
    "float16": (5, 10),
    "bfloat16": (8, 7),
    "float8_e4m3fn": (4, 3),
    "float8_e5m2": (5, 2),
}


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of an 8- or 16-bit dtype, decoded, as float64."""
    bits = torch.finfo(dtype).bits
    patterns = torch.arange(2**bits, dtype=torch.int32)
    int_dtype = torch.uint8 if bits == 8 else torch.int16
    return patterns.to(int_dtype).view(dtype).to(torch.float64)


def test_formats_lists_the_seven_formats_widest_first():
    assert list(FORMATS) == list(SPEC_LAYOUTS)
    assert all(name == fmt.name for name, fmt in FORMATS.items())


@pytest.mark.parametrize("name", list(SPEC_LAYOUTS))
def test_layout_matches_the_specification(name):
    fmt = FORMATS[name]
    assert (fmt.exponent_bits, fmt.mantissa_bits) == SPEC_LAYOUTS[name]
    assert fmt.bits == 1 + sum(SPEC_LAYOUTS[name])


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_fields_match_torch_finfo(dtype):
    fmt = get_format(dtype)
    info = torch.finfo(dtype)
    assert fmt.torch_dtype is dtype
    assert fmt.bits == info.bits == dtype.itemsize * 8
    assert fmt.max == info.max
    assert fmt.min_normal == info.smallest_normal
    assert fmt.eps == info.eps


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_min_subnormal_is_the_value_of_bit_pattern_one(dtype):
    int_dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}
    one = torch.ones(1, dtype=int_dtype[torch.finfo(dtype).bits])
    assert get_format(dtype).min_subnormal == one.view(dtype).to(torch.float64).item()


@pytest.mark.parametrize("dtype", NARROW_DTYPES, ids=str)
def test_fields_match_the_decoded_bit_patterns(dtype):
    fmt = get_format(dtype)
    values = every_value(dtype)
    finite = values[values.isfinite()]
    assert fmt.max == finite.max().item()
    assert fmt.min_subnormal == finite[finite > 0].min().item()
    assert fmt.has_inf == bool(values.isinf().any())
    assert fmt.has_nan == bool(values.isnan().any())


def test_float8_e4m3fn_has_no_inf_and_a_single_nan_pattern_per_sign():
    values = every_value(torch.float8_e4m3fn)
    assert int(values.isnan().sum()) == 2
    assert FORMATS["float8_e4m3fn"].max == 448.0
    assert FORMATS["float8_e5m2"].max == 57344.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ieee_binary_formats_have_inf_and_nan(dtype):
    fmt = get_format(dtype)
    assert fmt.has_inf and fmt.has_nan


def test_tfloat32_matches_the_formulas_for_8_exponent_and_10_mantissa_bits():
    # NVIDIA A100 whitepaper: float32's 8-bit exponent, float16's 10-bit mantissa.
    fmt = FORMATS["tfloat32"]
    assert fmt.torch_dtype is None
    assert fmt.bits == 19
    assert fmt.max == (2 - 2**-10) * 2.0**127
    assert fmt.min_normal == 2.0**-126
    assert fmt.min_subnormal == 2.0**-136
    assert fmt.eps == 2.0**-10
    assert fmt.has_inf and fmt.has_nan


@pytest.mark.parametrize("name", list(SPEC_LAYOUTS))
def test_decimal_digits_is_significand_bits_times_log10_of_2(name):
    fmt = FORMATS[name]
    with mpmath.workdps(50):
        expected = mpmath.log10(mpmath.mpf(2) ** (fmt.mantissa_bits + 1))
    assert fmt.decimal_digits == pytest.approx(float(expected), rel=1e-15)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_whole_decimal_digits_below_one_ulp_match_torch_resolution(dtype):
    # torch.finfo.resolution is 10**-floor(-log10(eps)), the digits eps resolves.
    fmt = get_format(dtype)
    whole_digits = math.floor(fmt.decimal_digits - math.log10(2))
    assert 10.0**-whole_digits == pytest.approx(torch.finfo(dtype).resolution)


def test_float_format_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FORMATS["float16"].max = 1.0


def test_formats_mapping_is_read_only():
    with pytest.raises(TypeError):
        FORMATS["float16"] = FORMATS["bfloat16"]


def test_public_api_is_exported_from_the_package():
    assert finite.get_format is get_format
    assert finite.FORMATS is FORMATS
    assert finite.FloatFormat is FloatFormat


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("float64", "float64"),
        ("fp64", "float64"),
        ("double", "float64"),
        ("float32", "float32"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("single", "float32"),
        ("tf32", "tfloat32"),
        ("tfloat32", "tfloat32"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("float8_e4m3fn", "float8_e4m3fn"),
        ("fp8_e4m3fn", "float8_e4m3fn"),
        ("fp8_e4m3", "float8_e4m3fn"),
        ("e4m3", "float8_e4m3fn"),
        ("e4m3fn", "float8_e4m3fn"),
        ("float8_e5m2", "float8_e5m2"),
        ("fp8_e5m2", "float8_e5m2"),
        ("e5m2", "float8_e5m2"),
    ],
)
def test_get_format_accepts_names_and_aliases(alias, name):
    assert get_format(alias) is FORMATS[name]


@pytest.mark.parametrize("spelling", ["BF16", " Bfloat16 ", "torch.bfloat16", "TORCH.BFLOAT16"])
def test_get_format_ignores_case_whitespace_and_torch_prefix(spelling):
    assert get_format(spelling) is FORMATS["bfloat16"]


def test_get_format_reads_dashes_as_underscores():
    assert get_format("fp8-e4m3") is FORMATS["float8_e4m3fn"]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_get_format_accepts_torch_dtypes(dtype):
    assert get_format(dtype).torch_dtype is dtype


def test_get_format_returns_a_float_format_as_is():
    custom = dataclasses.replace(FORMATS["float16"], name="my_half")
    assert get_format(custom) is custom


def test_get_format_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="valid names") as error:
        get_format("float12")
    assert "bf16" in str(error.value) and "float8_e5m2" in str(error.value)


def test_get_format_rejects_bare_fp8_as_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        get_format("fp8")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fnuz, torch.int32, torch.bool], ids=str)
def test_get_format_rejects_unsupported_dtypes(dtype):
    with pytest.raises(ValueError, match="supported dtypes"):
        get_format(dtype)


@pytest.mark.parametrize("value", [16, 2.0, None, True, ["fp16"]])
def test_get_format_rejects_other_types(value):
    with pytest.raises(TypeError, match="fmt must be"):
        get_format(value)
