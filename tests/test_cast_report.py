import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import finite
from finite.formats import CastReport, cast_report, report

CAST_DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]

# The value halfway between float8_e4m3fn's max (448) and the next step of its grid
# (480, which would be the NaN pattern): beyond it the cast saturates.
E4M3_OVERFLOW_THRESHOLD = 464.0


def mixed_tensor(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Values across 80 binades, with zeros, infinities and NaNs mixed in."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(50_000, generator=generator, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-40, 40, x.shape, generator=generator).double())
    x[::97] = 0.0
    x[::101] = math.inf
    x[::103] = -math.inf
    x[::107] = math.nan
    return x.to(dtype)


def counts_by_direct_cast(x: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    """The report's fields, counted on ``x.to(dtype)`` in float64."""
    x64 = x.double()
    cast = x.to(dtype).double()
    info = torch.finfo(dtype)
    finite = x64.isfinite()
    nonzero = finite & (x64 != 0)
    if dtype == torch.float8_e4m3fn:  # saturates instead of overflowing to inf
        overflow = finite & (x64.abs() > E4M3_OVERFLOW_THRESHOLD)
    else:
        overflow = finite & cast.isinf()
    normal = nonzero & ~overflow & (cast.abs() >= info.smallest_normal)
    rel_error = ((cast - x64).abs() / x64.abs())[normal]
    largest = x64[finite].abs().max().item()
    return {
        "overflow": overflow.sum().item() / finite.sum().item(),
        "underflow": (nonzero & (cast == 0)).sum().item() / nonzero.sum().item(),
        "subnormal": (nonzero & (cast != 0) & (cast.abs() < info.smallest_normal)).sum().item()
        / nonzero.sum().item(),
        "max_rel_error": rel_error.max().item(),
        "mean_rel_error": rel_error.mean().item(),
        "headroom_bits": math.log2(info.max / largest),
        "already_nonfinite": (~finite).sum().item() / x.numel(),
    }


def assert_matches(result: CastReport, expected: dict[str, float]) -> None:
    for field in ("overflow", "underflow", "subnormal", "already_nonfinite"):
        assert getattr(result, field) == expected[field], field
    for field in ("max_rel_error", "mean_rel_error", "headroom_bits"):
        assert getattr(result, field) == pytest.approx(expected[field], rel=1e-6), field


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_fractions_match_counts_by_direct_cast(dtype, input_dtype):
    x = mixed_tensor(input_dtype)
    result = cast_report(x, dtype)
    assert result.numel == x.numel()
    assert result.format == finite.get_format(dtype).name
    assert_matches(result, counts_by_direct_cast(x, dtype))


@pytest.mark.parametrize(
    ("input_dtype", "dtype"),
    [
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.float16, torch.float8_e4m3fn),
        (torch.bfloat16, torch.float8_e5m2),
    ],
    ids=str,
)
def test_low_precision_input_matches_counts_by_direct_cast(input_dtype, dtype):
    x = mixed_tensor(input_dtype)
    assert_matches(cast_report(x, dtype), counts_by_direct_cast(x, dtype))


def test_fp8_input_is_accepted():
    x = torch.tensor([1.0, 448.0, 2.0**-9]).to(torch.float8_e4m3fn)
    result = cast_report(x, "fp16")
    assert (result.overflow, result.underflow, result.max_rel_error) == (0.0, 0.0, 0.0)


def test_values_between_max_and_the_overflow_threshold_are_rounding_not_overflow():
    result = cast_report(torch.tensor([65510.0, 65520.0]), "fp16")
    assert result.overflow == 0.5
    assert result.headroom_bits < 0  # 65520 > max, though only one element overflows


def test_float8_e4m3fn_saturation_counts_as_overflow():
    result = cast_report(torch.tensor([450.0, 464.0, 465.0, 1e4]), "e4m3")
    assert result.overflow == 0.5


def test_tfloat32_report_counts_the_overflow_of_float32_max():
    x = torch.tensor([torch.finfo(torch.float32).max, 1.0, 2.0**-130])
    result = cast_report(x, "tf32")
    assert result.overflow == pytest.approx(1 / 3)
    assert result.subnormal == pytest.approx(1 / 3)
    assert result.headroom_bits < 0


def test_chunked_report_equals_single_chunk_report(monkeypatch):
    x = mixed_tensor()
    whole = cast_report(x, "bf16")
    monkeypatch.setattr(report, "_CHUNK_NUMEL", 1000)
    chunked = cast_report(x, "bf16")
    assert dataclasses.replace(chunked, mean_rel_error=whole.mean_rel_error) == whole
    assert chunked.mean_rel_error == pytest.approx(whole.mean_rel_error, rel=1e-12)


@pytest.mark.parametrize(
    "view",
    [lambda x: x.t(), lambda x: x[:, ::3], lambda x: x.unsqueeze(1).expand(-1, 4, -1)],
    ids=["transpose", "strided", "expanded"],
)
def test_non_contiguous_input_with_small_chunks_matches_contiguous(monkeypatch, view):
    x = view(mixed_tensor().reshape(250, 200))
    expected = cast_report(x.contiguous(), "fp16")
    monkeypatch.setattr(report, "_CHUNK_NUMEL", 64)
    result = cast_report(x, "fp16")
    assert dataclasses.replace(result, mean_rel_error=expected.mean_rel_error) == expected
    assert result.mean_rel_error == pytest.approx(expected.mean_rel_error, rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_chunks_cover_every_element_once(chunk):
    x = torch.arange(24.0).reshape(2, 3, 4).transpose(0, 2)
    pieces = list(report._flat_chunks(x, chunk))
    assert all(piece.numel() <= chunk for piece in pieces)
    assert sorted(torch.cat(pieces).tolist()) == list(range(24))


def test_empty_tensor_reports_no_events_and_undefined_errors():
    result = cast_report(torch.empty(0), "fp16")
    assert result.numel == 0
    assert (result.overflow, result.underflow, result.subnormal) == (0.0, 0.0, 0.0)
    assert result.already_nonfinite == 0.0
    assert math.isnan(result.max_rel_error) and math.isnan(result.mean_rel_error)
    assert result.headroom_bits == math.inf


def test_all_zero_tensor_has_infinite_headroom():
    result = cast_report(torch.zeros(5), "e4m3")
    assert result.headroom_bits == math.inf
    assert result.underflow == 0.0


def test_all_nan_tensor_is_already_nonfinite_and_does_not_overflow():
    result = cast_report(torch.full((4,), math.nan), "fp16")
    assert result.already_nonfinite == 1.0
    assert result.overflow == 0.0
    assert result.headroom_bits == math.inf


def test_report_holds_plain_python_numbers():
    result = cast_report(mixed_tensor(), "fp16")
    for field in dataclasses.fields(CastReport):
        assert type(getattr(result, field.name)) in (int, float, str), field.name


def test_report_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        cast_report(torch.ones(2), "fp16").overflow = 1.0


@given(values=st.lists(st.floats(width=32), min_size=1, max_size=50))
def test_fractions_are_fractions_and_errors_are_bounded(values):
    result = cast_report(torch.tensor(values), "bf16")
    for field in ("overflow", "underflow", "subnormal", "already_nonfinite"):
        assert 0.0 <= getattr(result, field) <= 1.0
    if not math.isnan(result.max_rel_error):  # half an ulp of bfloat16, relative
        assert 0.0 <= result.mean_rel_error <= result.max_rel_error <= 2.0**-8


def test_input_requiring_grad_is_accepted():
    x = torch.randn(10, requires_grad=True)
    assert cast_report(x, "fp16").numel == 10


def test_cast_report_is_exported_from_the_package():
    assert finite.cast_report is cast_report
    assert finite.CastReport is CastReport


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_rejects_non_floating_tensors(dtype):
    with pytest.raises(TypeError, match="x must be a real floating-point tensor"):
        cast_report(torch.zeros(3, dtype=dtype), "fp16")


def test_rejects_unknown_formats():
    with pytest.raises(ValueError, match="valid names"):
        cast_report(torch.ones(3), "fp7")
    with pytest.raises(TypeError, match="fmt must be"):
        cast_report(torch.ones(3), 8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
def test_cuda_report_equals_cpu_report(dtype):
    x = mixed_tensor()
    on_cuda = cast_report(x.cuda(), dtype)
    on_cpu = cast_report(x, dtype)
    assert dataclasses.replace(on_cuda, mean_rel_error=on_cpu.mean_rel_error) == on_cpu
    assert on_cuda.mean_rel_error == pytest.approx(on_cpu.mean_rel_error, rel=1e-12)
