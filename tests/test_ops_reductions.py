"""Specification of ``finite.ops`` sums and statistics: compensated_sum, mean_var, l2_norm.

References are independent of the code under test: exact rational sums
(``fractions.Fraction``), ``math.fsum``, float64 PyTorch, and mpmath at high precision.
"""

import math
from fractions import Fraction

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import finite.ops.reductions as reductions
from finite.ops import compensated_sum, l2_norm, mean_var

LOW = [torch.bfloat16, torch.float16]
FLOATS = [torch.float32, torch.float64, *LOW]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def exact_sum(values: torch.Tensor) -> Fraction:
    return sum((Fraction(v) for v in values.double().flatten().tolist()), Fraction(0))


def ulp(value: float, dtype: torch.dtype) -> float:
    """Spacing of ``dtype`` at ``value`` (the subnormal spacing near 0)."""
    info = torch.finfo(dtype)
    exponent = max(math.frexp(abs(value))[1] - 1, math.frexp(info.tiny)[1] - 1)
    return info.eps * 2.0**exponent


def neighbours(exact: Fraction, dtype: torch.dtype) -> set[float]:
    """The values of ``dtype`` just below and just above ``exact`` (one if representable)."""
    value = torch.tensor(float(exact), dtype=torch.float64).to(dtype)
    up, down = torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)
    while Fraction(value.item()) > exact:
        value = torch.nextafter(value, down)
    below = value
    while Fraction(value.item()) < exact:
        value = torch.nextafter(value, up)
    return {below.item(), value.item()}


def ill_conditioned(n: int, dtype: torch.dtype, seed: int, spread: int = 30) -> torch.Tensor:
    """Terms over 2*spread binades in which half of them cancel exactly, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    exponents = torch.randint(-spread, spread, (n,), generator=gen).double()
    terms = (torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp2(exponents)).to(dtype)
    terms = torch.cat([terms, -terms[: n // 2]])
    return terms[torch.randperm(terms.numel(), generator=gen)]


def sum2_bound(values: torch.Tensor, exact: Fraction) -> float:
    """Ogita-Rump-Oishi's Sum2 bound u|s| + ((n-1) u)**2 sum|x|, in the compute dtype."""
    u = UNIT_ROUNDOFF[values.dtype]
    n = values.numel()
    return u * abs(float(exact)) + ((n - 1) * u) ** 2 * values.double().abs().sum().item()


# --------------------------------------------------------------------------------------
# compensated_sum
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("big", "dtype"), [(1e8, torch.float32), (1e16, torch.float64), (1e300, torch.float64)]
)
def test_compensated_sum_recovers_a_term_swamped_by_cancelling_ones(big, dtype):
    x = torch.tensor([big, 1.0, -big], dtype=dtype)
    assert compensated_sum(x).item() == float(exact_sum(x)) == 1.0
    assert x.sum().item() != 1.0  # the case is hard for plain summation


def test_compensated_sum_of_float32_terms_stays_within_the_float64_bound():
    # float32 terms are summed in float64: a term 1e30 times smaller than cancelling
    # ones is below float64's reach, but the error stays within (n-1) 2**-53 sum|x|.
    x = torch.tensor([1e30, 1.0, -1e30])
    error = abs(Fraction(compensated_sum(x).item()) - exact_sum(x))
    assert error <= Fraction(2 * 2.0**-53) * sum(Fraction(abs(v)) for v in x.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 17, 200, 1000, 5000])
def test_compensated_sum_of_ill_conditioned_terms_is_within_the_sum2_bound(dtype, n):
    for seed in range(3):
        x = ill_conditioned(n, dtype, seed)
        exact = exact_sum(x)
        error = abs(Fraction(compensated_sum(x).item()) - exact)
        assert error <= Fraction(sum2_bound(x, exact))
        # In practice it is correctly rounded: within half a unit in the last place.
        assert error <= Fraction(ulp(float(exact), dtype)) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compensated_sum_beats_torch_sum_on_ill_conditioned_sums(dtype):
    ours, theirs = [], []
    for seed in range(20):
        x = ill_conditioned(4000, dtype, seed, spread=40)
        exact = exact_sum(x)
        spacing = Fraction(ulp(float(exact), dtype))
        ours.append(abs(Fraction(compensated_sum(x).item()) - exact) / spacing)
        theirs.append(abs(Fraction(x.sum().item()) - exact) / spacing)
    assert all(o <= t for o, t in zip(ours, theirs, strict=True))
    assert max(ours) <= Fraction(1, 2) < 8 < max(theirs)


def test_compensated_sum_of_many_small_terms_and_large_cancelling_ones_is_near_fsum():
    small = torch.full((100_000,), 0.1, dtype=torch.float32)
    x = torch.cat([torch.tensor([3e7, -3e7]), small, torch.tensor([1e9, -1e9])])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    reference = math.fsum(x.double().tolist())  # the exact sum rounded to float64
    spacing = ulp(reference, torch.float32)
    ours = abs(compensated_sum(x).item() - reference)
    theirs = abs(x.sum().item() - reference)
    # The documented bound allows far more (sum|x| is 2e9); torch.sum is off by ~100 units.
    assert ours <= 2 * spacing < theirs / 10


@pytest.mark.parametrize("dtype", LOW)
def test_compensated_sum_of_low_precision_input_is_one_of_the_exact_sums_neighbours(dtype):
    for seed in range(10):
        x = ill_conditioned(3000, dtype, seed, spread=6)
        result = compensated_sum(x)
        assert result.dtype == dtype
        assert result.item() in neighbours(exact_sum(x), dtype)


@pytest.mark.parametrize(
    ("big", "small", "dtype"), [(3e38, 1e31, torch.float32), (1.5e308, 1.0, torch.float64)]
)
def test_compensated_sum_partial_sums_do_not_overflow_when_the_sum_is_finite(big, small, dtype):
    x = torch.tensor([big, big, -big, -big, small], dtype=dtype)
    assert compensated_sum(x).item() == x[-1].item()


def test_compensated_sum_of_subnormals_is_exact():
    x = torch.tensor([1e-45, 3e-45, -1e-45, 2e-44, 1e-40])
    assert Fraction(compensated_sum(x).item()) == exact_sum(x)


def test_compensated_sum_overflows_only_when_the_exact_sum_does():
    assert compensated_sum(torch.tensor([3e38, 3e38])).item() == math.inf


@pytest.mark.parametrize(
    "values",
    [
        [math.inf, 1.0],
        [-math.inf, 1.0],
        [math.inf, -math.inf],
        [math.nan, 1.0],
        [math.inf, math.nan],
    ],
)
def test_compensated_sum_propagates_inf_and_nan_like_torch_sum(values):
    x = torch.tensor(values)
    torch.testing.assert_close(compensated_sum(x), x.sum(), equal_nan=True)


@pytest.mark.parametrize("dtype", FLOATS)
def test_compensated_sum_of_an_empty_reduction_is_zero(dtype):
    x = torch.ones(3, 0, dtype=dtype)
    torch.testing.assert_close(compensated_sum(x, 1), torch.zeros(3, dtype=dtype))


def test_compensated_sum_of_a_scalar_is_the_scalar():
    assert compensated_sum(torch.tensor(2.5)).item() == 2.5


def test_compensated_sum_of_float64_does_not_depend_on_the_cpu_tiling(monkeypatch):
    x = ill_conditioned(3000, torch.float64, 0).reshape(-1, 500)
    wide = ill_conditioned(5000, torch.float64, 1)[None]
    expected = compensated_sum(x, 1), compensated_sum(wide, 1)
    monkeypatch.setattr(reductions, "_CPU_TILE_ELEMENTS", 64)  # tiles of rows and of chunks
    assert torch.equal(compensated_sum(x, 1), expected[0])
    assert torch.equal(compensated_sum(wide, 1), expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_compensated_sum_of_narrow_terms_is_exact_sum_neighbour_with_any_tiling(monkeypatch, dtype):
    # Tiles of several rows, and tiles of part of one row (the row's partial sums are
    # then added in float64).
    x = ill_conditioned(3000, dtype, 2, spread=6).reshape(-1, 500)
    wide = ill_conditioned(5000, dtype, 3, spread=6)[None]
    monkeypatch.setattr(reductions, "_CPU_WIDEN_ELEMENTS", 1000)
    for data in (x, wide):
        for got, row in zip(compensated_sum(data, 1).tolist(), data, strict=True):
            assert got in neighbours(exact_sum(row), dtype)


@settings(max_examples=60)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    dtype=st.sampled_from(FLOATS),
    keepdim=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_compensated_sum_reduces_any_dims_like_torch_sum(shape, dtype, keepdim, seed, data):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    ndim = len(shape)
    dims = data.draw(st.none() | st.sets(st.integers(0, max(ndim - 1, 0)), min_size=1))
    dim = None if dims is None or ndim == 0 else tuple(dims)
    result = compensated_sum(x, dim, keepdim)
    expected_shape = (
        torch.sum(x, dim=dim, keepdim=keepdim).shape
        if dim
        else (torch.Size([1] * ndim) if keepdim else torch.Size([]))
    )
    assert result.shape == expected_shape and result.dtype == dtype
    reduced = tuple(range(ndim)) if dim is None else dim
    kept = [d for d in range(ndim) if d not in reduced]
    n_rows = math.prod(x.shape[d] for d in kept)
    rows = x.permute(kept + list(reduced)).reshape(n_rows, math.prod(x.shape[d] for d in reduced))
    for got, row in zip(result.flatten().tolist(), rows, strict=True):
        assert got in neighbours(exact_sum(row), dtype)


@settings(max_examples=60)
@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=300
    )
)
def test_compensated_sum_of_finite_float32_values_is_within_the_sum2_bound(values):
    x = torch.tensor(values, dtype=torch.float32)
    exact = exact_sum(x)
    assume_finite = abs(exact) < Fraction(torch.finfo(torch.float32).max)
    result = compensated_sum(x).item()
    if assume_finite:
        assert math.isfinite(result)
        assert abs(Fraction(result) - exact) <= Fraction(sum2_bound(x, exact)) + Fraction(
            ulp(float(exact), torch.float32)
        )


def test_compensated_sum_handles_non_contiguous_and_non_trailing_dims():
    x = ill_conditioned(1600, torch.float64, 3).reshape(40, 60).t()  # (60, 40), transposed
    for dim in (0, 1):
        expected = [float(exact_sum(row)) for row in x.movedim(dim, -1)]
        assert compensated_sum(x, dim).tolist() == expected


def test_compensated_sum_gradient_is_ones():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, dtype=torch.float64)
    (compensated_sum(x, 1) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream[:, None, :].expand(3, 4, 5))


@pytest.mark.parametrize(("dim", "keepdim"), [(None, False), ((0, 2), True), (-1, False)])
def test_compensated_sum_passes_gradcheck(dim, keepdim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: compensated_sum(t, dim, keepdim), (x,))


@pytest.mark.parametrize("dtype", LOW)
def test_compensated_sum_gradient_has_the_input_dtype(dtype):
    x = torch.randn(4, 6).to(dtype).requires_grad_()
    compensated_sum(x, 1).sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.ones_like(x))


def test_compensated_sum_works_under_cpu_autocast():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        total = compensated_sum(y, 1)
    assert total.dtype == torch.bfloat16
    total.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"x": torch.ones(3, dtype=torch.int64)}, TypeError, "x"),
        ({"x": torch.ones(3, dtype=torch.bool)}, TypeError, "x"),
        ({"x": torch.ones(3, dtype=torch.complex64)}, TypeError, "x"),
        ({"x": [1.0, 2.0]}, TypeError, "x"),
        ({"x": torch.ones(3), "dim": 1}, ValueError, "dim"),
        ({"x": torch.ones(3, 2), "dim": (0, -2)}, ValueError, "dim"),
        ({"x": torch.ones(3), "dim": ()}, ValueError, "dim"),
        ({"x": torch.ones(3), "dim": 0.5}, TypeError, "dim"),
        ({"x": torch.ones(3), "keepdim": 1}, TypeError, "keepdim"),
    ],
)
def test_compensated_sum_rejects_bad_arguments_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        compensated_sum(**kwargs)


@pytest.mark.cuda
def test_compensated_sum_on_cuda_matches_cpu():
    x = ill_conditioned(5000, torch.float32, 7).reshape(10, 750)
    torch.testing.assert_close(compensated_sum(x.cuda(), 1).cpu(), compensated_sum(x, 1))


@pytest.mark.slow
def test_compensated_sum_compiles():
    # aot_eager traces forward and backward like inductor, without compiling kernels.
    compiled = torch.compile(compensated_sum, backend="aot_eager", fullgraph=True)
    x = ill_conditioned(200, torch.float32, 0).reshape(3, 100).requires_grad_()
    result = compiled(x, 1)
    torch.testing.assert_close(result, compensated_sum(x, 1))
    result.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


# --------------------------------------------------------------------------------------
# mean_var
# --------------------------------------------------------------------------------------


def exact_var_mean(x: torch.Tensor, dim, correction) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance and mean of each slice in exact rational arithmetic, rounded to float64."""
    dims = tuple(range(x.ndim)) if dim is None else (dim,) if isinstance(dim, int) else dim
    kept = [d for d in range(x.ndim) if d not in dims]
    rows = x.permute(*kept, *dims).reshape(-1, math.prod(x.shape[d] for d in dims))
    means, variances = [], []
    for row in rows.double().tolist():
        values = [Fraction(v) for v in row]
        mean = sum(values, Fraction(0)) / len(values)
        means.append(float(mean))
        deviation = sum(((v - mean) ** 2 for v in values), Fraction(0))
        variances.append(float(deviation / (len(values) - Fraction(correction))))
    shape = [x.shape[d] for d in kept]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64).reshape(shape)  # noqa: E731
    return as_tensor(variances), as_tensor(means)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("dim", "correction"), [(0, 0), (1, 1), ((0, 2), 1), (None, 0.5)])
def test_mean_var_is_within_two_units_of_the_exact_values(dtype, dim, correction):
    x = (torch.randn(6, 7, 8, dtype=torch.float64) * 3 + 5).to(dtype)
    mean, var = mean_var(x, dim, correction=correction)
    ref_var, ref_mean = exact_var_mean(x, dim, correction)
    eps = torch.finfo(dtype).eps
    assert mean.dtype == var.dtype == dtype
    assert ((mean.double() - ref_mean).abs() <= 2 * eps * ref_mean.abs()).all()
    assert ((var.double() - ref_var).abs() <= 2 * eps * ref_var.abs()).all()


def test_mean_var_keepdim_keeps_reduced_dims():
    mean, var = mean_var(torch.randn(2, 3, 4), (0, 2), keepdim=True)
    assert mean.shape == var.shape == (1, 3, 1)


@pytest.mark.parametrize("dtype", LOW)
def test_mean_var_of_low_precision_input_is_within_one_unit(dtype):
    x = (torch.randn(16, 500) * 4 + 100).to(dtype)
    mean, var = mean_var(x, 1, correction=1)
    ref_var, ref_mean = torch.var_mean(x.double(), 1, correction=1)
    for got, ref in ((mean, ref_mean), (var, ref_var)):
        assert got.dtype == dtype
        spacing = torch.tensor([ulp(v, dtype) for v in ref.tolist()], dtype=torch.float64)
        assert ((got.double() - ref).abs() <= spacing).all()


def test_mean_var_keeps_a_small_variance_that_the_naive_formula_loses():
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(10_000, generator=gen) * 1e-2  # float32
    naive = (x * x).mean() - x.mean() ** 2
    reference = x.double().var(correction=0).item()  # about 1e-4
    assert abs(naive.item() - reference) > 100 * reference  # naive: 0, negative or far off
    _, var = mean_var(x, 0)
    assert abs(var.item() - reference) <= 4 * torch.finfo(torch.float32).eps * reference


@settings(max_examples=60)
@given(
    offset=st.floats(-1e6, 1e6, width=32),
    noise=st.floats(0, 1e-2),
    n=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_mean_var_variance_is_never_negative(offset, noise, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (offset + noise * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    mean, var = mean_var(x, 0)
    assert var.item() >= 0 and math.isfinite(var.item()) and math.isfinite(mean.item())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("value", [0.1, -3.7, 1e30, 1e-40])
def test_mean_var_of_a_constant_slice_is_exact(dtype, value):
    x = torch.full((7, 3), value, dtype=torch.float64).to(dtype)
    if not x.isfinite().all():
        pytest.skip(f"{value} is not finite in {dtype}")
    mean, var = mean_var(x, 0, correction=1)
    assert torch.equal(mean, x[0]) and torch.equal(var, torch.zeros(3, dtype=dtype))


def test_mean_var_returns_mean_first():
    mean, var = mean_var(torch.tensor([1.0, 3.0]), 0)
    assert (mean.item(), var.item()) == (2.0, 1.0)


@pytest.mark.parametrize(("values", "correction"), [([5.0], 1), ([1.0, 2.0], 2), ([], 0)])
def test_mean_var_without_degrees_of_freedom_matches_torch(values, correction):
    x = torch.tensor(values, dtype=torch.float64)
    mean, var = mean_var(x, 0, correction=correction)
    with pytest.warns(UserWarning):
        ref_var, ref_mean = torch.var_mean(x, 0, correction=correction)
    torch.testing.assert_close(mean, ref_mean, equal_nan=True)
    torch.testing.assert_close(var, ref_var, equal_nan=True)


@pytest.mark.parametrize("values", [[math.inf, 1.0], [math.nan, 1.0], [math.inf, math.inf]])
def test_mean_var_of_non_finite_entries_has_nan_variance(values):
    _, var = mean_var(torch.tensor(values), 0)
    assert math.isnan(var.item())


@pytest.mark.parametrize(("dim", "correction"), [(1, 0), ((0, 2), 1)])
def test_mean_var_passes_gradcheck(dim, correction):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mean_var(t, dim, correction=correction), (x,))


def exact_variance_gradient(row: list[float], correction: float) -> list[Fraction]:
    """d var / d x_i = 2 (x_i - mean) / (n - correction), in rational arithmetic."""
    values = [Fraction(v) for v in row]
    mean = sum(values, Fraction(0)) / len(values)
    return [2 * (v - mean) / (len(values) - Fraction(correction)) for v in values]


@pytest.mark.parametrize(
    ("dtype", "units"), [(torch.float32, 4), (torch.float64, 4), *[(d, 1) for d in LOW]]
)
@pytest.mark.parametrize(("correction", "length"), [(0, 2), (0, 5), (1, 5), (0, 32), (1, 32)])
def test_mean_var_variance_gradient_keeps_its_digits_near_the_mean(
    dtype, units, correction, length
):
    # A large offset plus small noise: x - round(mean) would be mostly the rounding
    # error of the mean (hundreds of ulps in float32 and float64).
    gen = torch.Generator().manual_seed(5)
    signs = torch.randint(0, 2, (16, 1), generator=gen).double() * 2 - 1
    base = signs * 10 ** (2 + 2 * torch.rand(16, 1, generator=gen, dtype=torch.float64))
    noise = 1e-3 * torch.randn(16, length, generator=gen, dtype=torch.float64)
    x = (base * (1 + noise)).to(dtype)
    leaf = x.clone().requires_grad_()
    _, var = mean_var(leaf, 1, correction=correction)
    var.sum().backward()
    for got, row in zip(leaf.grad.double(), x.double().tolist(), strict=True):
        exact_row = exact_variance_gradient(row, correction)
        for value, exact in zip(got.tolist(), exact_row, strict=True):
            assert abs(Fraction(value) - exact) <= units * Fraction(ulp(float(exact), dtype))


def test_mean_var_gradient_of_the_mean_is_one_over_n():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    mean, _ = mean_var(x, 1)
    mean.sum().backward()
    assert torch.equal(x.grad, torch.full((5, 6), 1 / 6, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_var_compiles(dtype):
    # aot_eager traces forward and backward like inductor, without compiling kernels.
    compiled = torch.compile(
        lambda t: mean_var(t, 1, correction=1), fullgraph=True, backend="aot_eager"
    )
    x = (torch.randn(3, 40, generator=torch.Generator().manual_seed(9)) + 50).to(dtype)
    eager_leaf, compiled_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, result = mean_var(eager_leaf, 1, correction=1), compiled(compiled_leaf)
    torch.testing.assert_close(result, eager)
    sum(eager).sum().backward()
    sum(result).sum().backward()
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


def test_mean_var_gradient_of_a_constant_slice_is_that_of_the_mean():
    x = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    mean, var = mean_var(x, 0)
    (mean + var).backward()
    torch.testing.assert_close(x.grad, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize(
    ("correction", "error"),
    [(-1, ValueError), (math.inf, ValueError), (True, TypeError), ("1", TypeError)],
)
def test_mean_var_rejects_a_bad_correction_by_name(correction, error):
    with pytest.raises(error, match="correction"):
        mean_var(torch.ones(3), 0, correction=correction)


def test_mean_var_rejects_integer_input():
    with pytest.raises(TypeError, match="x"):
        mean_var(torch.ones(3, dtype=torch.int32), 0)


# --------------------------------------------------------------------------------------
# l2_norm
# --------------------------------------------------------------------------------------


def mp_norm(values: torch.Tensor) -> mpmath.mpf:
    with mpmath.workdps(60):
        return mpmath.sqrt(mpmath.fsum(mpmath.mpf(v) ** 2 for v in values.double().tolist()))


def test_l2_norm_of_float16_values_near_the_maximum_does_not_overflow():
    x = torch.tensor([6000.0, 8000.0, 30000.0], dtype=torch.float16)
    assert torch.linalg.vector_norm(x.double()).half().item() == l2_norm(x).item()
    assert torch.isinf((x * x).sum())  # the squares overflow in float16


def test_l2_norm_above_the_float16_maximum_rounds_to_inf():
    x = torch.tensor([60000.0, 60000.0], dtype=torch.float16)
    assert l2_norm(x).item() == math.inf  # 84853 is not a float16


@pytest.mark.parametrize("scale", [1e30, 1e38, 1e-30, 1e-40, 1e-45])
def test_l2_norm_of_float32_extremes_matches_float64(scale):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(50, generator=gen, dtype=torch.float64) * scale / 10).float()
    x[0] = scale  # the extreme value itself
    reference = torch.linalg.vector_norm(x.double())
    result = l2_norm(x).double()
    assert abs(result - reference) <= ulp(reference.item(), torch.float32)


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-320])
def test_l2_norm_of_float64_extremes_matches_mpmath(scale):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(50, generator=gen, dtype=torch.float64) * scale
    reference = mp_norm(x)
    assert abs(mpmath.mpf(l2_norm(x).item()) - reference) <= ulp(float(reference), torch.float64)


@settings(max_examples=60)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    dtype=st.sampled_from(FLOATS),
    log_scale=st.integers(-40, 38),
    seed=st.integers(0, 2**16),
)
def test_l2_norm_is_finite_and_within_one_unit_of_float64(shape, dtype, log_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    x = (
        (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**log_scale)
        .clamp(-info.max, info.max)
        .to(dtype)
    )
    if dtype == torch.float64:
        rows = x.reshape(-1, shape[-1])
        reference = torch.tensor([float(mp_norm(row)) for row in rows], dtype=torch.float64)
        reference = reference.reshape(shape[:-1])
    else:
        reference = torch.linalg.vector_norm(x.double(), dim=-1)
    x.requires_grad_()
    result = l2_norm(x, -1)
    result.sum().backward()
    assert torch.isfinite(x.grad).all()
    fits = reference <= info.max
    spacing = [ulp(v, dtype) for v in reference.flatten().tolist()]
    spacing = torch.tensor(spacing, dtype=torch.float64)
    close = (result.detach().double() - reference).abs() <= spacing.reshape(reference.shape)
    assert (close | ~fits).all()
    assert torch.isinf(result[~fits]).all()


def test_l2_norm_gradient_at_extremes_is_the_unit_direction():
    x = torch.tensor([3e37, -4e37], requires_grad=True)
    l2_norm(x).backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.6, -0.8]))
    tiny = torch.tensor([3e-45, 4e-45], requires_grad=True)
    l2_norm(tiny).backward()
    expected = tiny.detach().double() / torch.linalg.vector_norm(tiny.detach().double())
    torch.testing.assert_close(tiny.grad.double(), expected, rtol=1e-6, atol=0)


def test_l2_norm_of_the_zero_vector_is_zero_with_zero_gradient():
    x = torch.zeros(2, 5, requires_grad=True)
    result = l2_norm(x, 1)
    result.sum().backward()
    assert torch.equal(result, torch.zeros(2)) and torch.equal(x.grad, torch.zeros(2, 5))


def test_l2_norm_of_infinite_entries_is_inf_with_the_limit_gradient():
    x = torch.tensor([[math.inf, 1.0, -math.inf], [math.inf, 2.0, 3.0]], requires_grad=True)
    result = l2_norm(x, 1)
    result.sum().backward()
    assert torch.isinf(result).all()
    k = math.sqrt(2.0)
    torch.testing.assert_close(x.grad, torch.tensor([[1 / k, 0.0, -1 / k], [1.0, 0.0, 0.0]]))


def test_l2_norm_propagates_nan():
    x = torch.tensor([math.nan, 1.0], requires_grad=True)
    result = l2_norm(x)
    result.backward()
    assert math.isnan(result.item()) and torch.isnan(x.grad).all()


@pytest.mark.parametrize(("dim", "keepdim"), [(None, False), (1, True), ((0, 2), False)])
def test_l2_norm_passes_gradcheck(dim, keepdim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: l2_norm(t, dim, keepdim), (x,))


def test_l2_norm_matches_torch_vector_norm_shapes():
    x = torch.randn(2, 3, 4)
    for dim, keepdim in [(None, False), (None, True), (1, True), ((0, 2), False)]:
        expected = torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)
        torch.testing.assert_close(l2_norm(x, dim, keepdim), expected)


def test_l2_norm_of_an_empty_slice_is_zero():
    assert torch.equal(l2_norm(torch.ones(2, 0), 1), torch.zeros(2))


def test_l2_norm_rejects_integer_input():
    with pytest.raises(TypeError, match="x"):
        l2_norm(torch.ones(3, dtype=torch.int64))


def test_l2_norm_works_under_cpu_autocast():
    layer = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm = l2_norm(layer(torch.randn(4, 8)), 1)
    assert norm.dtype == torch.bfloat16
    norm.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
