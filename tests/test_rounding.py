import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import finite
from finite.formats import FORMATS, round_to
from finite.formats.rounding import stochastic_round

CAST_DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
INPUT_DTYPES = [torch.float32, torch.float64]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}

# (exponent bits, mantissa bits, has infinities) per the IEEE 754, bfloat16, TF32 and OCP
# OFP8 specifications; typed here so the reference does not lean on FloatFormat.
LAYOUTS = {
    "float64": (11, 52, True),
    "float32": (8, 23, True),
    "tfloat32": (8, 10, True),
    "float16": (5, 10, True),
    "bfloat16": (8, 7, True),
    "float8_e4m3fn": (4, 3, False),
    "float8_e5m2": (5, 2, True),
}


def torch_e4m3_saturates(device: str = "cpu") -> bool:
    """PyTorch's float8_e4m3fn cast saturates since pytorch/pytorch#178817; before, NaN."""
    return torch.tensor(1e4, device=device).to(torch.float8_e4m3fn).float().item() == 448.0


def reference_round(value: float, name: str, direction: str = "nearest") -> float:
    """``value`` rounded to format ``name`` in exact rational arithmetic.

    ``direction``: "nearest" (ties to even, overflow to inf, or saturating without inf),
    "toward_zero" or "away_from_zero" (for finite values within range).
    """
    exponent_bits, mantissa_bits, has_inf = LAYOUTS[name]
    if math.isnan(value):
        return math.nan
    bias = 2 ** (exponent_bits - 1) - 1
    if has_inf:  # the all-ones exponent is reserved for inf and NaN
        largest = Fraction(2 ** (mantissa_bits + 1) - 1, 2**mantissa_bits) * 2 ** (bias)
    else:  # the all-ones exponent holds values; only the all-ones significand is NaN
        largest = Fraction(2 ** (mantissa_bits + 1) - 2, 2**mantissa_bits) * 2 ** (bias + 1)
    overflow = math.inf if has_inf else float(largest)
    if math.isinf(value):
        return math.copysign(overflow, value)
    magnitude = Fraction(abs(value))
    if magnitude == 0:
        return value
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    spacing = Fraction(2) ** (max(exponent, 1 - bias) - mantissa_bits)
    steps, remainder = divmod(magnitude, spacing)
    if direction == "away_from_zero":
        steps += remainder > 0
    elif direction == "nearest":
        steps += 2 * remainder > spacing or (2 * remainder == spacing and steps % 2 == 1)
    rounded = steps * spacing
    return math.copysign(overflow if rounded > largest else float(rounded), value)


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN matches any NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = actual.isnan()
    if not torch.equal(nan, expected.isnan()):
        return False
    int_dtype = INT_VIEW[actual.dtype]
    return torch.equal(actual[~nan].view(int_dtype), expected[~nan].view(int_dtype))


def same_float(actual: float, expected: float) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    return actual == expected and math.copysign(1, actual) == math.copysign(1, expected)


def every_finite_value(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an 8- or 16-bit dtype, sorted, as float64."""
    bits = torch.finfo(dtype).bits
    patterns = torch.arange(2**bits, dtype=torch.int32)
    values = patterns.to(torch.uint8 if bits == 8 else torch.int16).view(dtype).double()
    return values[values.isfinite()].unique()


def edge_inputs(dtype: torch.dtype) -> torch.Tensor:
    """float32 values where rounding to ``dtype`` is hardest to get right.

    Every value of ``dtype``, every midpoint between neighbours (ties, including the
    one half a spacing above max where overflow starts, and half the smallest
    subnormal) and the float32 values either side of each midpoint, plus zeros,
    infinities, NaN and values far beyond the range.
    """
    values = every_finite_value(dtype)
    spacing_at_max = values[-1] - values[-2]
    values = torch.cat([values, values[-1:] + spacing_at_max, -values[:1] - spacing_at_max])
    midpoints = ((values[1:] + values[:-1]) / 2).float()  # exact: one more bit than dtype
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e30, -1e30, 3.4e38])
    return torch.cat(
        [
            values[1:-1].float(),
            midpoints,
            torch.nextafter(midpoints, torch.tensor(math.inf)),
            torch.nextafter(midpoints, torch.tensor(-math.inf)),
            special,
        ]
    )


def random_bit_patterns(count: int, seed: int) -> torch.Tensor:
    """float32 values from uniformly random bit patterns: every exponent, NaNs, subnormals."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-(2**31), 2**31, (count,), dtype=torch.int64, generator=generator)
    return patterns.to(torch.int32).view(torch.float32)


def skip_if_torch_e4m3_overflows_to_nan(dtype, device="cpu"):
    if dtype == torch.float8_e4m3fn and not torch_e4m3_saturates(device):
        pytest.skip("this torch casts float8_e4m3fn overflow to NaN; round_to saturates")


# --- round to nearest against torch's cast ----------------------------------------------


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_nearest_matches_torch_cast_on_ties_ranges_and_specials(dtype, input_dtype):
    skip_if_torch_e4m3_overflows_to_nan(dtype)
    # float32 values, so torch's float64 cast (which goes through float32) rounds once.
    x = edge_inputs(dtype).to(input_dtype)
    assert same_bits(round_to(x, dtype), x.to(dtype).to(input_dtype))


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_nearest_matches_torch_cast_on_random_bit_patterns(dtype, input_dtype):
    skip_if_torch_e4m3_overflows_to_nan(dtype)
    x = random_bit_patterns(1 << 16, seed=CAST_DTYPES.index(dtype)).to(input_dtype)
    assert same_bits(round_to(x, dtype), x.to(dtype).to(input_dtype))


@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_nearest_matches_torch_cast_on_normal_random_values(dtype):
    generator = torch.Generator().manual_seed(7)
    scale = torch.exp2(torch.randint(-30, 20, (1 << 16,), generator=generator).float())
    x = torch.randn(1 << 16, generator=generator) * scale
    skip_if_torch_e4m3_overflows_to_nan(dtype)
    assert same_bits(round_to(x, dtype), x.to(dtype).float())


@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_float64_input_just_off_a_tie_rounds_toward_its_side(dtype):
    # torch's cast from float64 goes through float32, which lands these on the tie and
    # may then round the wrong way; round_to rounds once.
    values = every_finite_value(dtype)
    values = values[values >= 0]
    lower, upper = values[:-1], values[1:]
    midpoints = (lower + upper) / 2
    above = torch.nextafter(midpoints, torch.tensor(math.inf, dtype=torch.float64))
    below = torch.nextafter(midpoints, torch.tensor(-math.inf, dtype=torch.float64))
    assert torch.equal(round_to(above, dtype), upper)
    assert torch.equal(round_to(below, dtype), lower)


def test_float64_input_is_rounded_once_where_torch_cast_rounds_twice():
    x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert round_to(x, torch.float16).item() == 1 + 2**-10
    assert reference_round(x.item(), "float16") == 1 + 2**-10


def test_float32_input_to_float32_and_float64_is_unchanged():
    x = random_bit_patterns(1000, seed=3)
    assert same_bits(round_to(x, "float32"), x)
    assert same_bits(round_to(x, "float64"), x)
    assert same_bits(round_to(x.double(), "float64"), x.double())


def test_float64_input_to_float32_matches_torch_cast():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1 << 14, dtype=torch.float64, generator=generator)
    x = x * torch.exp2(torch.randint(-160, 140, x.shape, generator=generator).double())
    assert same_bits(round_to(x, "float32"), x.float().double())


# --- overflow ---------------------------------------------------------------------------


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
def test_float16_overflows_to_inf_from_half_a_spacing_above_max(input_dtype):
    x = torch.tensor([65504.0, 65519.99, 65520.0, 1e6, math.inf, -65520.0], dtype=input_dtype)
    expected = torch.tensor([65504.0, 65504.0, math.inf, math.inf, math.inf, -math.inf])
    assert torch.equal(round_to(x, "fp16"), expected.to(input_dtype))


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
def test_float8_e4m3fn_saturates_to_448_having_no_inf(input_dtype):
    # 464 is the tie between 448 and 480 (not a value: it would be the NaN pattern);
    # ties go to the even 448. Beyond, the OCP saturating conversion gives 448.
    x = torch.tensor([448.0, 463.9, 464.0, 464.1, 1e4, math.inf, -math.inf], dtype=input_dtype)
    expected = torch.tensor([448.0, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0])
    assert torch.equal(round_to(x, "e4m3"), expected.to(input_dtype))


def test_float8_e5m2_overflows_to_inf():
    x = torch.tensor([57344.0, 61439.0, 61440.0, -math.inf])
    expected = torch.tensor([57344.0, 57344.0, math.inf, -math.inf])
    assert torch.equal(round_to(x, "e5m2"), expected)


def test_float32_max_overflows_bfloat16_and_tfloat32():
    x = torch.tensor([torch.finfo(torch.float32).max])
    assert round_to(x, "bf16").item() == math.inf
    assert round_to(x, "tf32").item() == math.inf


# --- tfloat32 ---------------------------------------------------------------------------


def tfloat32_bit_mask_reference(x: torch.Tensor) -> torch.Tensor:
    """float32 -> tfloat32 on the bit pattern: drop 13 mantissa bits, ties to even.

    tfloat32 has float32's exponent field, so this integer rounding is also right for
    subnormals (a linear grid in the bit pattern) and overflows into the inf pattern.
    """
    bits = x.numpy().view(np.uint32).astype(np.uint64)
    sign = bits & 0x80000000
    magnitude = bits & 0x7FFFFFFF
    kept, dropped = np.divmod(magnitude, np.uint64(1 << 13))
    round_up = (dropped > (1 << 12)) | ((dropped == (1 << 12)) & (kept % 2 == 1))
    rounded = ((kept + round_up) << np.uint64(13)) | sign
    result = torch.from_numpy(rounded.astype(np.uint32).view(np.float32))
    return torch.where(x.isnan(), x, result)


def test_tfloat32_matches_a_bit_mask_reference_on_random_bit_patterns():
    x = random_bit_patterns(1 << 16, seed=5)
    assert same_bits(round_to(x, "tf32"), tfloat32_bit_mask_reference(x))


def test_tfloat32_matches_a_bit_mask_reference_on_ties_and_subnormals():
    steps = torch.arange(-(1 << 14), 1 << 14, dtype=torch.int32)
    near_one = (torch.tensor(1.0).view(torch.int32) + steps).view(torch.float32)
    subnormals = steps.abs().view(torch.float32)  # float32 subnormals and zero
    x = torch.cat([near_one, subnormals, -subnormals])
    assert same_bits(round_to(x, "tf32"), tfloat32_bit_mask_reference(x))


# --- properties against exact rational rounding -----------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
@given(values=st.lists(st.floats(), min_size=1, max_size=40))
def test_nearest_matches_exact_rounding_for_float64_input(name, values):
    rounded = round_to(torch.tensor(values, dtype=torch.float64), name).tolist()
    for value, actual in zip(values, rounded, strict=True):
        assert same_float(actual, reference_round(value, name)), value


@pytest.mark.parametrize("name", list(LAYOUTS))
@given(values=st.lists(st.floats(width=32), min_size=1, max_size=40))
def test_nearest_matches_exact_rounding_for_float32_input(name, values):
    rounded = round_to(torch.tensor(values, dtype=torch.float32), name).tolist()
    for value, actual in zip(values, rounded, strict=True):
        assert same_float(actual, reference_round(value, name)), value


@pytest.mark.parametrize("name", ["tfloat32", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
@given(values=st.lists(st.floats(allow_nan=False), min_size=1, max_size=40))
def test_nearest_is_idempotent_odd_and_monotone(name, values):
    x = torch.tensor(values, dtype=torch.float64).sort().values
    rounded = round_to(x, name)
    assert torch.equal(round_to(rounded, name), rounded)
    assert torch.equal(round_to(-x, name), -rounded)
    assert bool((rounded[1:] >= rounded[:-1]).all())


# --- stochastic rounding ----------------------------------------------------------------


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
@given(data=st.data())
def test_stochastic_returns_one_of_the_two_bracketing_values(name, input_dtype, data):
    largest = min(FORMATS[name].max, torch.finfo(input_dtype).max)
    width = torch.finfo(input_dtype).bits
    values = data.draw(
        st.lists(st.floats(-largest, largest, width=width), min_size=1, max_size=30, unique=True)
    )
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32)))
    x = torch.tensor(values, dtype=input_dtype).repeat(20)
    rounded = round_to(x, name, "stochastic", generator).tolist()
    for value, actual in zip(x.tolist(), rounded, strict=True):
        down = reference_round(value, name, "toward_zero")
        up = reference_round(value, name, "away_from_zero")
        assert same_float(actual, down) or same_float(actual, up), (value, actual)


def unbiasedness_cases(name):
    """(lower, upper, fraction of the way up) in the normal range, subnormal range, at max."""
    fmt = FORMATS[name]
    spacing_at_max = fmt.max * fmt.eps / (2 - fmt.eps)  # if max = (2 - eps) * 2**e
    if name == "float8_e4m3fn":
        spacing_at_max = fmt.max * fmt.eps / (2 - 2 * fmt.eps)
    return [
        (1.0, 1.0 + fmt.eps, 0.3),
        (-1.0 - fmt.eps, -1.0, 0.8),
        (2 * fmt.min_subnormal, 3 * fmt.min_subnormal, 0.3),
        (0.0, fmt.min_subnormal, 0.05),
        (fmt.max - spacing_at_max, fmt.max, 0.6),
    ]


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n not in ("float64", "float32")])
def test_stochastic_rounding_is_unbiased(name, input_dtype):
    draws = 20_000
    generator = torch.Generator().manual_seed(1234)
    for lower, upper, fraction in unbiasedness_cases(name):
        x = torch.tensor(lower + fraction * (upper - lower), dtype=input_dtype)
        up_probability = (x.item() - lower) / (upper - lower)  # x as actually stored
        rounded = round_to(x.expand(draws), name, "stochastic", generator).double()
        assert bool(((rounded == lower) | (rounded == upper)).all())
        went_up = (rounded == upper).double().mean().item()
        sigma = math.sqrt(up_probability * (1 - up_probability) / draws)
        assert abs(went_up - up_probability) < 5 * sigma, (lower, upper, went_up)


def test_stochastic_rounding_resolves_a_single_input_ulp():
    # 1 + 2**-23 lies 2**-13 of a float16 spacing above 1: it must round up that often.
    draws = 1 << 20
    x = torch.full((draws,), 1 + 2.0**-23)
    rounded = round_to(x, "fp16", "stochastic", torch.Generator().manual_seed(5))
    went_up = int((rounded > 1).sum())
    expected = draws * 2.0**-13
    assert abs(went_up - expected) < 5 * math.sqrt(expected)


@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_stochastic_keeps_representable_values(dtype):
    values = every_finite_value(dtype).float()
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(round_to(values, dtype, "stochastic", generator), values)


def test_stochastic_is_reproducible_with_a_seeded_generator():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    first = round_to(x, "bf16", "stochastic", torch.Generator().manual_seed(42))
    again = round_to(x, "bf16", "stochastic", torch.Generator().manual_seed(42))
    other = round_to(x, "bf16", "stochastic", torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", ["float16", "float8_e4m3fn", "float8_e5m2", "bfloat16"])
def test_stochastic_rounds_values_beyond_max_to_nearest(name):
    fmt = FORMATS[name]
    x = torch.tensor([fmt.max * 1.0001, fmt.max * 1.2, math.inf, -math.inf, -fmt.max * 1.2])
    generator = torch.Generator().manual_seed(0)
    stochastic = round_to(x.repeat(100), name, "stochastic", generator)
    assert torch.equal(stochastic, round_to(x, name).repeat(100))


def test_stochastic_keeps_nan_and_the_sign_of_zero():
    x = torch.tensor([math.nan, 0.0, -0.0, -1e-30])
    rounded = round_to(x, "fp16", "stochastic", torch.Generator().manual_seed(0))
    assert math.isnan(rounded[0])
    assert [math.copysign(1, v) for v in rounded[1:].tolist()] == [1, -1, -1]


# --- stochastic_round: float32 to a bfloat16/float16 tensor ------------------------------

SIXTEEN_BIT = [torch.bfloat16, torch.float16]


def neighbours(x64: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of ``dtype`` just below and above (or at) each float64 value."""
    nearest = x64.to(dtype)
    up = torch.nextafter(nearest, torch.full_like(nearest, math.inf))
    down = torch.nextafter(nearest, torch.full_like(nearest, -math.inf))
    above = nearest.double() >= x64
    lo = torch.where(above, down, nearest).double()
    hi = torch.where(above, nearest, up).double()
    exact = nearest.double() == x64
    return torch.where(exact, x64, lo), torch.where(exact, x64, hi)


# float32 values between grid points: normal range, float16 subnormals, negatives.
_BETWEEN_GRID = [1.0 + 2**-9, -1.0 - 3 * 2**-10, 0.3, 1234.567, 3.0e-6, -4.1e-7, 1.0e-7]


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_stochastic_round_is_unbiased(dtype):
    draws = 40_000
    x = torch.tensor(_BETWEEN_GRID, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    rounded = stochastic_round(x.expand(draws, -1).contiguous(), dtype, generator).double()
    lo, hi = neighbours(x.double(), dtype)
    # Two-point distribution: the std of the mean is at most (hi - lo) / (2 sqrt(draws)).
    tolerance = (hi - lo) * 5 / (2 * math.sqrt(draws))
    assert torch.all((rounded.mean(0) - x.double()).abs() <= tolerance)


def test_stochastic_round_resolves_float16_subnormals_to_2_pow_minus_24_of_their_spacing():
    # 2**-14 of a subnormal spacing above 3 * 2**-24: rounds up with probability 2**-14.
    draws = 1 << 20
    x = torch.full((draws,), 3 * 2.0**-24 + 2.0**-38)
    rounded = stochastic_round(x, torch.float16, torch.Generator().manual_seed(6)).double()
    assert bool(((rounded == 3 * 2.0**-24) | (rounded == 4 * 2.0**-24)).all())
    went_up = int((rounded > 3 * 2.0**-24).sum())
    expected = draws * 2.0**-14
    assert abs(went_up - expected) < 5 * math.sqrt(expected)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
@given(values=st.lists(st.floats(-6e4, 6e4, width=32), min_size=1, max_size=64))
def test_stochastic_round_lands_on_a_neighbour(dtype, values):
    x = torch.tensor(values, dtype=torch.float32)
    rounded = stochastic_round(x, dtype)
    assert rounded.dtype == dtype
    lo, hi = neighbours(x.double(), dtype)
    assert torch.all((rounded.double() == lo) | (rounded.double() == hi))


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_stochastic_round_keeps_representable_values(dtype):
    values = every_finite_value(dtype)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(stochastic_round(values.float(), dtype, generator), values.to(dtype))


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_stochastic_round_outside_finite_range_rounds_to_nearest(dtype):
    big, eps = torch.finfo(dtype).max, torch.finfo(dtype).eps
    # Within half an ulp above the largest value (nearest: the largest value), and beyond.
    just_above, far_above = big * (1 + eps / 8), big * (1 + 4 * eps)
    x = torch.tensor([math.inf, -math.inf, math.nan, just_above, -just_above, far_above])
    got = stochastic_round(x, dtype)
    assert torch.equal(got.isnan(), x.to(dtype).isnan())
    assert torch.equal(got[~got.isnan()], x.to(dtype)[~got.isnan()])


def test_stochastic_round_keeps_the_sign_of_zero():
    x = torch.tensor([-0.0, -1e-9, -1e-42])
    for dtype in SIXTEEN_BIT:
        assert torch.all(torch.signbit(stochastic_round(x, dtype)))


def test_stochastic_round_rejects_input_other_than_float32():
    with pytest.raises(TypeError, match=r"x must be a float32 tensor, got dtype torch\.float64"):
        stochastic_round(torch.ones(2, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        stochastic_round([1.0], torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.int8], ids=str)
def test_stochastic_round_rejects_targets_other_than_16_bit_floats(dtype):
    with pytest.raises(TypeError, match=rf"dtype must be .*, got {dtype}"):
        stochastic_round(torch.ones(2), dtype)


# --- special values, shapes, errors -----------------------------------------------------


@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_nan_stays_nan_and_zeros_keep_their_sign(name, mode):
    x = torch.tensor([math.nan, -math.nan, 0.0, -0.0])
    rounded = round_to(x, name, mode)
    assert bool(rounded[:2].isnan().all())
    assert [math.copysign(1, v) for v in rounded[2:].tolist()] == [1, -1]


@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
def test_result_has_the_shape_dtype_and_layout_of_the_input(mode):
    x = torch.randn(6, 5, dtype=torch.float64).t()
    rounded = round_to(x, "bf16", mode)
    assert rounded.shape == x.shape and rounded.dtype == x.dtype
    assert torch.equal(round_to(x.contiguous(), "bf16"), round_to(x, "bf16"))
    assert round_to(torch.tensor(1.5), "e4m3").shape == ()
    assert round_to(torch.empty(0, 3), "e4m3").shape == (0, 3)


def test_result_is_detached_from_autograd():
    x = torch.randn(4, requires_grad=True)
    assert not round_to(x, "fp16").requires_grad


def test_round_to_is_exported_from_the_package():
    assert finite.round_to is round_to


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8], ids=str
)
def test_rejects_non_floating_tensors(dtype):
    with pytest.raises(TypeError, match="x must be a real floating-point tensor"):
        round_to(torch.zeros(3, dtype=dtype), "fp16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e5m2], ids=str)
def test_rejects_low_precision_input_asking_to_upcast(dtype):
    with pytest.raises(TypeError, match=r"float32 or float64.*x\.float\(\)"):
        round_to(torch.zeros(3, dtype=dtype), "e4m3")


def test_rejects_non_tensors():
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        round_to([1.0, 2.0], "fp16")


def test_rejects_unknown_modes_and_formats():
    with pytest.raises(ValueError, match="mode must be one of"):
        round_to(torch.ones(2), "fp16", mode="up")
    with pytest.raises(ValueError, match="valid names"):
        round_to(torch.ones(2), "fp12")
    with pytest.raises(TypeError, match="fmt must be"):
        round_to(torch.ones(2), 16)


# --- CUDA -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("input_dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cuda_nearest_matches_cpu(name, input_dtype):
    x = torch.cat([random_bit_patterns(1 << 16, seed=9), edge_inputs(torch.bfloat16)])
    x = x.to(input_dtype)
    assert same_bits(round_to(x.cuda(), name).cpu(), round_to(x, name))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_cuda_nearest_matches_torch_cuda_cast(dtype):
    skip_if_torch_e4m3_overflows_to_nan(dtype, "cuda")
    x = torch.cat([random_bit_patterns(1 << 16, seed=10), edge_inputs(dtype)]).cuda()
    assert same_bits(round_to(x, dtype), x.to(dtype).float())


@pytest.mark.cuda
def test_cuda_stochastic_is_reproducible_and_unbiased():
    x = torch.full((100_000,), 1 + 0.25 * 2**-7, device="cuda")
    first = round_to(x, "bf16", "stochastic", torch.Generator("cuda").manual_seed(3))
    again = round_to(x, "bf16", "stochastic", torch.Generator("cuda").manual_seed(3))
    assert torch.equal(first, again)
    went_up = (first > 1).double().mean().item()
    assert abs(went_up - 0.25) < 5 * math.sqrt(0.25 * 0.75 / x.numel())
