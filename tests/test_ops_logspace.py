"""finite.ops log-space functions against mpmath (50 digits), SciPy and PyTorch.

References are computed on the exact values of the rounded inputs. Errors are in ULPs of
the output dtype: |y - exact| / spacing(exact), the spacing being that of the binade of
the exact value (the subnormal spacing below the smallest normal).
"""

import math
import zlib

import mpmath
import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given
from hypothesis import strategies as st

import finite.ops.logspace as logspace_module
from finite.ops import log1mexp, log1pexp, logaddexp, logmeanexp, logsubexp, logsumexp

mpmath.mp.dps = 50
INF = math.inf
NAN = math.nan
FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# Reference helpers
# --------------------------------------------------------------------------------------


def ulp_errors(actual: torch.Tensor, exact: list, dtype: torch.dtype) -> np.ndarray:
    """Error of each element of ``actual`` in ULPs of ``dtype`` at the exact value."""
    info = torch.finfo(dtype)
    mantissa_bits = -int(math.log2(info.eps))
    min_exponent = int(math.log2(info.tiny))
    errors = []
    for value, ref in zip(actual.double().flatten().tolist(), exact, strict=True):
        if mpmath.isnan(ref) or mpmath.isinf(ref) or not math.isfinite(value):
            same = (math.isnan(value) and mpmath.isnan(ref)) or value == ref
            errors.append(0.0 if same else INF)
            continue
        exponent = mpmath.frexp(ref)[1] - 1 if ref != 0 else min_exponent
        spacing = mpmath.ldexp(1, max(exponent, min_exponent) - mantissa_bits)
        errors.append(float(abs(mpmath.mpf(value) - ref) / spacing))
    return np.array(errors)


def mp_logsumexp(row: list[float]) -> mpmath.mpf:
    return mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row))


def mp_log1mexp(x: float) -> mpmath.mpf:
    x = mpmath.mpf(x)
    # Each form at 50 digits keeps the digits of the result on its side of -1.
    return mpmath.log(-mpmath.expm1(x)) if x > -1 else mpmath.log1p(-mpmath.exp(x))


def mp_log1pexp(x: float) -> mpmath.mpf:
    return mpmath.log1p(mpmath.exp(mpmath.mpf(x)))


def rows_of(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def without_cancellation(rows: list[list[float]], exact: list) -> np.ndarray:
    """Rows whose result is not a cancellation of the max and the log of the sum.

    Both terms carry a rounding error of their own size; where ``|m| + |result - m|``
    exceeds ``2 |result|``, that error is several ulps of the result for any float64
    method without extended precision (e.g. logsumexp([-0.6, -0.7]) ~ 0.05). float32 is
    computed in float64 and needs no such filter.
    """
    keep = []
    for row, result in zip(rows, exact, strict=True):
        m = max(row)
        keep.append(abs(m) + abs(result - m) <= 2 * abs(result))
    return np.array(keep)


def float64_ulp(value) -> mpmath.mpf:
    """The spacing of float64 at ``|value|`` (normal range)."""
    return mpmath.ldexp(1, mpmath.frexp(value)[1] - 53)


def seeded_rows(kind: str, rows: int = 40, cols: int = 6) -> torch.Tensor:
    """Hard-case generators for logsumexp, float64."""
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    normal = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if kind == "scale 1":
        return normal
    if kind == "scale 1e2":
        return normal * 1e2
    if kind == "scale 1e4":
        return normal * 1e4
    if kind == "near ties":
        return 3.0 + normal * 1e-6
    if kind == "huge spread":
        return torch.cat([normal[:, :1], normal[:, 1:] * 1e4], dim=1)
    if kind == "dominant max near 0":
        tail = -30 - 10 * torch.rand(rows, cols - 1, generator=g, dtype=torch.float64)
        return torch.cat([normal[:, :1] * 1e-3, tail], dim=1)
    if kind == "cancelling":
        # Shifted so that the sum of exponentials is 1 + O(1e-3): the result ~ 1e-3 is
        # the difference of a max in [-log n, 0] and the log of the sum.
        offsets = 1e-3 * torch.randn(rows, 1, generator=g, dtype=torch.float64)
        return normal - torch.logsumexp(normal, dim=1, keepdim=True) + offsets
    if kind == "max above 708":
        # exp(-m) overflows, and x - m rounds for the x below m / 2.
        x = 60 + 700 * torch.rand(rows, cols, generator=g, dtype=torch.float64)
        x[:, 0] = 760 + normal[:, 0]
        return x
    if kind == "max below -log 2":
        return -300.0 + normal * 250
    raise ValueError(kind)


HARD_CASES = (
    "scale 1",
    "scale 1e2",
    "scale 1e4",
    "near ties",
    "huge spread",
    "dominant max near 0",
)
# Where x_i - m rounds in float64 whatever the shift.
OFFSET_CASES = ("max above 708", "max below -log 2")


# --------------------------------------------------------------------------------------
# logsumexp: accuracy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", HARD_CASES)
def test_logsumexp_is_within_2_ulp_of_mpmath(kind, dtype):
    x = seeded_rows(kind).to(dtype)
    exact = [mp_logsumexp(row) for row in rows_of(x)]
    errors = ulp_errors(logsumexp(x, dim=1), exact, dtype)
    keep = without_cancellation(rows_of(x), exact)
    assert keep.mean() > 0.8
    if dtype == torch.float32:
        keep[:] = True
    assert errors[keep].max() <= 2.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", [*HARD_CASES, "cancelling"])
def test_logsumexp_is_never_less_accurate_than_torch(kind, dtype):
    x = seeded_rows(kind).to(dtype)
    exact = [mp_logsumexp(row) for row in rows_of(x)]
    ours = ulp_errors(logsumexp(x, dim=1), exact, dtype)
    theirs = ulp_errors(torch.logsumexp(x, dim=1), exact, dtype)
    assert ours.max() <= max(theirs.max(), 2.0)


@pytest.mark.parametrize(
    "x",
    [
        seeded_rows("cancelling").to(torch.float32),
        # The worst row of the audit's float32 inputs (PyTorch: 101 ulp).
        torch.tensor([[-0.34608620405197144, -1.23513662815094]]),
    ],
    ids=["seeded", "audit"],
)
def test_float32_logsumexp_is_within_half_an_ulp_where_the_result_cancels(x):
    exact = [mp_logsumexp(row) for row in rows_of(x)]
    assert not without_cancellation(rows_of(x), exact).any()
    # Rounded once from float64: half an ulp, plus 2**-29 ulp per unit of cancellation.
    assert ulp_errors(logsumexp(x, dim=1), exact, torch.float32).max() <= 0.51


def test_float64_logsumexp_error_where_the_result_cancels_is_an_ulp_of_the_max():
    # The documented limit: |m| ~ log(s), and rounding either to float64 costs that
    # much; the result ~ 1e-3 is then off by hundreds of its own ulps.
    x = seeded_rows("cancelling")
    for row, value in zip(rows_of(x), logsumexp(x, dim=1).tolist(), strict=True):
        scale = max(float64_ulp(max(row)), float64_ulp(1.0))
        assert abs(mpmath.mpf(value) - mp_logsumexp(row)) <= 2 * scale


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("kind", ["scale 1", "scale 1e2", "near ties", "dominant max near 0"])
def test_logsumexp_low_precision_is_one_of_the_two_neighbours(kind, dtype):
    x = seeded_rows(kind).to(dtype)
    exact = [mp_logsumexp(row) for row in rows_of(x)]
    assert ulp_errors(logsumexp(x, dim=1), exact, dtype).max() < 1.0


def test_logsumexp_keeps_a_tiny_rest_that_torch_rounds_away():
    x = torch.tensor([0.0, -30.0])
    exact = mpmath.log1p(mpmath.exp(-30))
    assert ulp_errors(logsumexp(x, dim=0), [exact], torch.float32)[0] <= 1.0
    # torch.logsumexp computes log(1 + 9.4e-14) in float32, which is 0.
    assert torch.logsumexp(x, dim=0).item() == 0.0


def test_logsumexp_of_a_subnormal_max_keeps_the_small_terms():
    x = torch.tensor([1e-40, -95.0], dtype=torch.float32)
    exact = mp_logsumexp(rows_of(x))
    assert ulp_errors(logsumexp(x, dim=0), [exact], torch.float32)[0] <= 1.0


def mp_softmax(rows: list[list[float]]) -> list:
    exact = []
    for row in rows:
        lse = mp_logsumexp(row)
        exact.extend(mpmath.exp(mpmath.mpf(v) - lse) for v in row)
    return exact


@pytest.mark.parametrize("kind", [*HARD_CASES, *OFFSET_CASES, "cancelling"])
def test_float64_logsumexp_gradient_is_within_4_ulp_of_the_mpmath_softmax(kind):
    # Where x_i - m rounds (max above 708 or below -log 2, large spreads), its rounding
    # error is recovered and fed back in; exp alone would turn it into hundreds of ulps.
    x = seeded_rows(kind).requires_grad_()
    logsumexp(x, dim=1).sum().backward()
    exact = mp_softmax(rows_of(x.detach()))
    assert ulp_errors(x.grad, exact, torch.float64).max() <= 4.0


@pytest.mark.parametrize("kind", [*HARD_CASES, *OFFSET_CASES, "cancelling"])
def test_float32_logsumexp_gradient_is_within_an_ulp_of_the_mpmath_softmax(kind):
    # Half an ulp (the kept softmax is rounded once from float64), and at most one where
    # it is subnormal: it is kept times 2**64 and scaled back.
    x = seeded_rows(kind).to(torch.float32).requires_grad_()
    logsumexp(x, dim=1).sum().backward()
    exact = mp_softmax(rows_of(x.detach()))
    assert ulp_errors(x.grad, exact, torch.float32).max() <= 1.0


def test_float32_logsumexp_gradient_is_within_an_ulp_for_any_incoming_gradient():
    # The kept softmax (half an ulp) times the incoming gradient, rounded once more.
    g = torch.Generator().manual_seed(16)
    x = seeded_rows("scale 1e2").to(torch.float32).requires_grad_()
    cotangent = torch.randn(x.shape[0], generator=g) * 3
    logsumexp(x, dim=1).backward(cotangent)
    probs = mp_softmax(rows_of(x.detach()))
    weights = [mpmath.mpf(c) for c in cotangent.tolist() for _ in range(x.shape[1])]
    exact = [c * p for c, p in zip(weights, probs, strict=True)]
    assert ulp_errors(x.grad, exact, torch.float32).max() <= 1.0


@pytest.mark.parametrize("fn", [logsumexp, logmeanexp])
def test_a_second_backward_pass_with_retain_graph_gives_the_same_gradient(fn):
    # float32 turns the softmax kept by the forward pass into the gradient in place; the
    # second pass must recompute it.
    x = seeded_rows("scale 1e2").to(torch.float32).requires_grad_()
    y = fn(x, 1).sum()
    (first,) = torch.autograd.grad(y, x, retain_graph=True)
    (second,) = torch.autograd.grad(y, x)
    exact = mp_softmax(rows_of(x.detach()))
    assert ulp_errors(first, exact, torch.float32).max() <= 1.0
    assert ulp_errors(second, exact, torch.float32).max() <= 1.0


def test_float32_logsumexp_gradient_keeps_its_digits_under_a_loss_scale():
    # Probabilities below float32's smallest normal (exp(-95) ~ 5e-42) times a loss scale
    # of 2**16 are normal numbers: they must not carry the rounding of a subnormal.
    x = torch.tensor([[0.0, -95.0, -100.5, -90.25]], requires_grad=True)
    logsumexp(x, dim=1).backward(torch.tensor([2.0**16]))
    exact = [2**16 * p for p in mp_softmax(rows_of(x.detach()))]
    assert ulp_errors(x.grad, exact, torch.float32).max() <= 1.0


def test_logsumexp_gradient_is_more_accurate_than_torch_at_scale_1e2():
    x = seeded_rows("scale 1e2").abs().requires_grad_()
    x_torch = x.detach().clone().requires_grad_()
    logsumexp(x, dim=1).sum().backward()
    torch.logsumexp(x_torch, dim=1).sum().backward()
    exact = []
    for row in rows_of(x.detach()):
        lse = mp_logsumexp(row)
        exact.extend(mpmath.exp(mpmath.mpf(v) - lse) for v in row)
    ours = ulp_errors(x.grad, exact, torch.float64)
    theirs = ulp_errors(x_torch.grad, exact, torch.float64)
    assert ours.max() <= 4.0 < theirs.max()


def test_logsumexp_gradcheck_float64_over_several_dims():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: logsumexp(t, dim=(0, 2)), (x,))
    assert torch.autograd.gradcheck(lambda t: logsumexp(t, dim=-1, keepdim=True), (x,))


def test_logsumexp_gradient_sums_to_one_over_the_slice():
    x = (torch.randn(8, 50, dtype=torch.float64) * 30).requires_grad_()
    logsumexp(x, dim=1).sum().backward()
    torch.testing.assert_close(x.grad.sum(dim=1), torch.ones(8, dtype=torch.float64))


# --------------------------------------------------------------------------------------
# logsumexp: weights and sign (SciPy semantics)
# --------------------------------------------------------------------------------------


def test_logsumexp_weights_and_sign_match_scipy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 7, generator=g, dtype=torch.float64) * 3
    weights = torch.randn(6, 1, generator=g, dtype=torch.float64)
    weights[2] = 0.0
    value, sign = logsumexp(x, dim=(0, 2), weights=weights, return_sign=True)
    ref_value, ref_sign = scipy.special.logsumexp(
        x.numpy(), axis=(0, 2), b=weights.numpy(), return_sign=True
    )
    np.testing.assert_allclose(value.numpy(), ref_value, rtol=1e-13)
    np.testing.assert_array_equal(sign.numpy(), ref_sign)


def test_logsumexp_negative_sum_without_return_sign_is_nan_like_scipy():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    weights = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert math.isnan(logsumexp(x, 0, weights=weights).item())
    assert math.isnan(scipy.special.logsumexp(x.numpy(), b=weights.numpy()))


@pytest.mark.parametrize(
    ("x", "weights"),
    [
        ([1.0, 1.0], [1.0, -1.0]),  # exact cancellation: -inf, sign 0
        ([INF, INF], [1.0, -0.5]),  # +inf entries of opposite weights: NaN
        ([INF, 5.0], [-1.0, 1.0]),  # -inf sum: log|s| = +inf, sign -1
        ([INF, 2.0], [0.0, 1.0]),  # a zero weight ignores the entry, even +inf
        ([NAN, 2.0], [0.0, 1.0]),  # ... and NaN
        ([-INF, -INF], [1.0, 1.0]),
        ([0.5, -3.0, 2.0], [2.0, 0.0, -1e-3]),
    ],
)
def test_logsumexp_weighted_edge_cases_match_scipy(x, weights):
    value, sign = logsumexp(
        torch.tensor(x, dtype=torch.float64),
        0,
        weights=torch.tensor(weights, dtype=torch.float64),
        return_sign=True,
    )
    ref_value, ref_sign = scipy.special.logsumexp(x, b=weights, return_sign=True)
    np.testing.assert_allclose(value.item(), ref_value, rtol=1e-14)
    np.testing.assert_equal(sign.item(), ref_sign)


def test_logsumexp_gradcheck_with_weights_that_require_grad():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(1, 5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()

    def value(t, w):
        return logsumexp(t, dim=1, weights=w)

    assert torch.autograd.gradcheck(value, (x, weights))


def test_logsumexp_gradcheck_with_signed_weights_and_return_sign():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def log_abs(t, w):
        return logsumexp(t, dim=1, weights=w, return_sign=True)[0]

    assert torch.autograd.gradcheck(log_abs, (x, weights))


def test_float32_weighted_logsumexp_and_its_gradients_are_within_half_an_ulp_of_mpmath():
    g = torch.Generator().manual_seed(15)
    x = seeded_rows("scale 1").to(torch.float32).requires_grad_()
    weights = (torch.rand(x.shape, generator=g) * 3 + 0.01).requires_grad_()
    logsumexp(x, 1, weights=weights).sum().backward()
    value = logsumexp(x.detach(), 1, weights=weights.detach())
    exact_value, exact_dx, exact_dw = [], [], []
    for row, w_row in zip(rows_of(x.detach()), rows_of(weights.detach()), strict=True):
        pairs = zip(row, w_row, strict=True)
        terms = [mpmath.mpf(w) * mpmath.exp(mpmath.mpf(v)) for v, w in pairs]
        total = mpmath.fsum(terms)
        exact_value.append(mpmath.log(total))
        exact_dx.extend(t / total for t in terms)
        exact_dw.extend(mpmath.exp(mpmath.mpf(v)) / total for v in row)
    assert ulp_errors(value, exact_value, torch.float32).max() <= 0.51
    assert ulp_errors(x.grad, exact_dx, torch.float32).max() <= 0.51
    assert ulp_errors(weights.grad, exact_dw, torch.float32).max() <= 0.51


def test_logsumexp_weight_gradient_is_exp_x_minus_result():
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    value = logsumexp(x, dim=1, weights=weights)
    value.sum().backward()
    torch.testing.assert_close(weights.grad, torch.exp(x - value.detach()))


# --------------------------------------------------------------------------------------
# logsumexp: infinities, NaN, empty slices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_neg_inf_slice_gives_neg_inf_and_zero_gradient(dtype):
    x = torch.tensor([[-INF, -INF, -INF], [0.0, 1.0, 2.0]], dtype=dtype, requires_grad=True)
    value, sign = logsumexp(x, dim=1, return_sign=True)
    value.sum().backward()
    assert value[0].item() == -INF and sign[0].item() == 0.0
    assert torch.equal(x.grad[0], torch.zeros(3, dtype=dtype))
    assert torch.isfinite(x.grad).all()


def test_torch_gives_nan_gradient_for_an_all_neg_inf_slice():
    x = torch.full((3,), -INF, requires_grad=True)
    torch.logsumexp(x, dim=0).backward()
    assert torch.isnan(x.grad).all()


def test_neg_inf_entries_get_zero_gradient():
    x = torch.tensor([-INF, 0.0, -INF, 1.0], dtype=torch.float64, requires_grad=True)
    logsumexp(x, dim=0).backward()
    assert x.grad[0].item() == 0.0 and x.grad[2].item() == 0.0
    torch.testing.assert_close(x.grad[[1, 3]], torch.softmax(x.detach()[[1, 3]], dim=0))


@pytest.mark.parametrize("dtype", FLOATS)
def test_pos_inf_entry_gives_pos_inf_and_nan_gradient_only_at_the_inf_entry(dtype):
    # 1000 is beyond where exp overflows even in float64.
    x = torch.tensor([1.0, INF, -3.0, 1000.0], dtype=dtype, requires_grad=True)
    value, sign = logsumexp(x, dim=0, return_sign=True)
    value.backward()
    assert value.item() == INF and sign.item() == 1.0
    assert math.isnan(x.grad[1].item())
    assert x.grad[0].item() == x.grad[2].item() == x.grad[3].item() == 0.0


def test_nan_propagates_to_value_sign_and_gradient():
    x = torch.tensor([[1.0, NAN, 2.0], [1.0, 2.0, 3.0]], requires_grad=True)
    value, sign = logsumexp(x, dim=1, return_sign=True)
    value.sum().backward()
    assert math.isnan(value[0].item()) and math.isnan(sign[0].item())
    assert torch.isnan(x.grad[0]).all() and torch.isfinite(x.grad[1]).all()


@pytest.mark.parametrize("fn", [logsumexp, logmeanexp])
def test_zero_slices_give_an_empty_result_and_gradient(fn):
    x = torch.empty(0, 5, requires_grad=True)
    value = fn(x, 1)
    value.sum().backward()
    assert value.shape == (0,) and x.grad.shape == (0, 5)


def test_empty_slice_gives_neg_inf_like_torch_and_logmeanexp_gives_nan_like_mean():
    x = torch.empty(3, 0, requires_grad=True)
    value = logsumexp(x, dim=1)
    assert torch.equal(value, torch.logsumexp(x.detach(), dim=1))
    value.sum().backward()
    assert x.grad.shape == (3, 0)
    assert torch.isnan(logmeanexp(torch.empty(2, 0), dim=1)).all()


# --------------------------------------------------------------------------------------
# logsumexp: shapes, dims, dtypes, layouts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dim", "keepdim"),
    [
        ((4, 5), 1, False),
        ((4, 5), 0, True),
        ((2, 3, 4), (0, 2), False),
        ((2, 3, 4), (-1, -3), True),
        ((2, 3, 4), None, False),
        ((5,), -1, True),
    ],
)
def test_logsumexp_matches_torch_on_shapes_and_dims(shape, dim, keepdim):
    x = torch.randn(shape, dtype=torch.float64)
    torch_dim = tuple(range(x.ndim)) if dim is None else dim
    expected = torch.logsumexp(x, dim=torch_dim, keepdim=keepdim)
    torch.testing.assert_close(logsumexp(x, dim, keepdim), expected)


def test_logsumexp_of_a_0d_tensor_is_the_value():
    x = torch.tensor(2.5)
    assert logsumexp(x, 0).item() == 2.5
    assert logsumexp(x, -1, keepdim=True).shape == ()


def test_logsumexp_on_a_non_contiguous_view_matches_torch():
    x = torch.randn(7, 9, dtype=torch.float64).t()[:, ::2]
    torch.testing.assert_close(logsumexp(x, 0), torch.logsumexp(x, 0))


@pytest.mark.parametrize("dtype", FLOATS)
def test_output_dtype_equals_input_dtype(dtype):
    x = torch.randn(3, 4).to(dtype).requires_grad_()
    value, sign = logsumexp(x, 1, return_sign=True)
    value.sum().backward()
    assert value.dtype == sign.dtype == x.grad.dtype == dtype
    assert logmeanexp(x, 1).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_blocks_give_the_same_result_as_one_block(monkeypatch, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(37, 11, generator=g, dtype=torch.float64) * 5).to(dtype)
    weights = torch.randn(37, 11, generator=g, dtype=torch.float64).to(dtype)
    results = []
    # One block; then blocks of 3 rows and a remainder.
    for block_elements in (1 << 21, 3 * 11):
        monkeypatch.setattr(logspace_module, "_CPU_BLOCK_ELEMENTS", block_elements)
        xs = [x.clone().requires_grad_() for _ in range(3)]
        plain = logsumexp(xs[0], 1)
        plain.sum().backward()
        weighted = logsumexp(xs[1], 1, weights=weights, return_sign=True)[0]
        weighted.sum().backward()
        mean = logmeanexp(xs[2], 1)
        mean.sum().backward()
        results.append((plain, weighted, mean, xs[0].grad, xs[1].grad, xs[2].grad))
    for one, many in zip(*results, strict=True):
        torch.testing.assert_close(one, many, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = torch.randn(64, 1000, dtype=torch.float64) * 10
    x[3] = -INF
    x[5, 7] = INF
    for dtype in FLOATS:
        cpu = x.to(dtype).clone().requires_grad_()
        gpu = x.to(dtype).cuda().requires_grad_()
        logsumexp(cpu, 1).sum().backward()
        logsumexp(gpu, 1).sum().backward()
        torch.testing.assert_close(logsumexp(gpu, 1).cpu(), logsumexp(cpu, 1), equal_nan=True)
        torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, equal_nan=True)


# --------------------------------------------------------------------------------------
# logmeanexp
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_logmeanexp_of_equal_values_is_exactly_the_value(dtype):
    x = torch.full((3, 7), 1e-3, dtype=dtype)
    assert torch.equal(logmeanexp(x, 1), x[:, 0])


def mp_logmeanexp(row: list[float]) -> mpmath.mpf:
    return mp_logsumexp(row) - mpmath.log(len(row))


def mean_cancelling_rows() -> torch.Tensor:
    """Rows whose mean of exponentials is 1 + O(1e-3): a max in [0, log n] and
    log(mean(exp(x - m))) cancel to a result ~ 1e-3."""
    x = seeded_rows("scale 1")
    offsets = 1e-3 * seeded_rows("near ties")[:, :1]
    return x - torch.logsumexp(x, dim=1, keepdim=True) + math.log(x.shape[1]) + offsets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["scale 1", "near ties", "huge spread", "dominant max near 0"])
def test_logmeanexp_is_within_2_ulp_of_mpmath(kind, dtype):
    x = seeded_rows(kind)
    x = (x.abs() + 1 if kind == "scale 1" else x).to(dtype)
    exact = [mp_logmeanexp(row) for row in rows_of(x)]
    keep = without_cancellation(rows_of(x), exact)
    assert keep.mean() > 0.5
    if dtype == torch.float32:
        keep[:] = True
    assert ulp_errors(logmeanexp(x, 1), exact, dtype)[keep].max() <= 2.0


@pytest.mark.parametrize(
    "x",
    [
        mean_cancelling_rows().to(torch.float32),
        # The worst row of the audit's float32 inputs (PyTorch: 58 ulp).
        torch.tensor([[0.4429231882095337, -0.798225998878479]]),
    ],
    ids=["seeded", "audit"],
)
def test_float32_logmeanexp_is_within_half_an_ulp_where_the_result_cancels(x):
    exact = [mp_logmeanexp(row) for row in rows_of(x)]
    assert ulp_errors(logmeanexp(x, 1), exact, torch.float32).max() <= 0.51


def test_float64_logmeanexp_error_where_the_result_cancels_is_an_ulp_of_the_max():
    x = mean_cancelling_rows()
    for row, value in zip(rows_of(x), logmeanexp(x, 1).tolist(), strict=True):
        scale = max(float64_ulp(max(row)), float64_ulp(1.0))
        assert abs(mpmath.mpf(value) - mp_logmeanexp(row)) <= 2 * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logmeanexp_is_never_less_accurate_than_torch(dtype):
    x = torch.cat([mean_cancelling_rows(), seeded_rows("scale 1"), seeded_rows("near ties")])
    x = x.to(dtype)
    exact = [mp_logmeanexp(row) for row in rows_of(x)]
    ours = ulp_errors(logmeanexp(x, 1), exact, dtype)
    theirs = ulp_errors(torch.logsumexp(x, 1) - math.log(x.shape[1]), exact, dtype)
    assert ours.max() <= max(theirs.max(), 2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["scale 1e2", "huge spread", *OFFSET_CASES])
def test_logmeanexp_gradient_is_within_the_ulp_target_of_the_mpmath_softmax(kind, dtype):
    x = seeded_rows(kind).to(dtype).requires_grad_()
    logmeanexp(x, 1).sum().backward()
    exact = mp_softmax(rows_of(x.detach()))
    assert ulp_errors(x.grad, exact, dtype).max() <= (4.0 if dtype == torch.float64 else 1.0)


def test_logmeanexp_near_zero_keeps_its_digits():
    x = torch.tensor([[1e-3, 1e-3 + 1e-9, 1e-3, 2e-3]], dtype=torch.float64)
    exact = mp_logsumexp(rows_of(x)[0]) - mpmath.log(4)
    assert ulp_errors(logmeanexp(x, 1), [exact], torch.float64)[0] <= 2.0


def test_logmeanexp_gradient_is_the_softmax():
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: logmeanexp(t, (1, 2)), (x,))
    logmeanexp(x, (1, 2)).sum().backward()
    torch.testing.assert_close(x.grad, torch.softmax(x.detach().flatten(1), 1).view_as(x))


def test_logmeanexp_all_neg_inf_gives_neg_inf_and_zero_gradient():
    x = torch.full((4,), -INF, requires_grad=True)
    value = logmeanexp(x, 0)
    value.backward()
    assert value.item() == -INF and torch.equal(x.grad, torch.zeros(4))


# --------------------------------------------------------------------------------------
# logsumexp / logmeanexp: bad input, hypothesis, autocast, compile
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: logsumexp(torch.arange(3), 0), TypeError, "x must be a real floating"),
        (lambda: logsumexp([1.0, 2.0], 0), TypeError, "x must be a torch.Tensor"),
        (lambda: logsumexp(torch.ones(3, dtype=torch.complex64), 0), TypeError, "x must"),
        (
            lambda: logsumexp(torch.ones(3), 0, weights=torch.ones(3, dtype=torch.int64)),
            TypeError,
            "weights must be a real floating",
        ),
        (
            lambda: logsumexp(torch.ones(3, 4), 1, weights=torch.ones(3)),
            ValueError,
            "weights of shape",
        ),
        (
            lambda: logsumexp(torch.ones(3), 0, weights=torch.ones(2, 3)),
            ValueError,
            "weights of shape",
        ),
        (lambda: logsumexp(torch.ones(3), 1), ValueError, "dim=1 is out of range"),
        (lambda: logsumexp(torch.ones(3, 2), (0, -2)), ValueError, "same dimension"),
        (lambda: logsumexp(torch.ones(3), ()), ValueError, "dim=()"),
        (lambda: logsumexp(torch.ones(3), 0.5), TypeError, "dim must be an int"),
        (lambda: logsumexp(torch.ones(3), 0, keepdim=1), TypeError, "keepdim must be a bool"),
        (lambda: logsumexp(torch.ones(3), 0, return_sign="yes"), TypeError, "return_sign"),
        (lambda: logmeanexp(torch.ones(3, dtype=torch.bool), 0), TypeError, "x must"),
        (lambda: logmeanexp(torch.ones(3), 2), ValueError, "dim=2"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


finite_values = st.one_of(
    st.floats(-1e4, 1e4),
    st.sampled_from([0.0, -0.0, 1e-40, -1e-40, 1e-300, 65000.0, -65000.0, 88.0, -104.0]),
)


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dtype=st.sampled_from(FLOATS),
    data=st.data(),
)
def test_hypothesis_finite_input_gives_finite_value_and_softmax_gradient(shape, dtype, data):
    values = data.draw(
        st.lists(finite_values, min_size=math.prod(shape), max_size=math.prod(shape))
    )
    x = torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)
    x = x.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).requires_grad_()
    dims = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    keepdim = data.draw(st.booleans())
    value = logsumexp(x, tuple(dims), keepdim)
    mean = logmeanexp(x, tuple(dims), keepdim)
    (value.sum() + mean.sum()).backward()
    assert torch.isfinite(value).all() and torch.isfinite(mean).all()
    assert torch.isfinite(x.grad).all()
    assert (x.grad >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_works_under_cpu_autocast(dtype):
    x = torch.randn(4, 6).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = logsumexp(x, 1) + logmeanexp(x, 1)
        pair = logaddexp(x, x.flip(1)) + logsubexp(x + 1, x) + log1pexp(x) + log1mexp(-x.abs())
    (value.sum() + pair.sum()).backward()
    assert value.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.slow
def test_logsumexp_under_torch_compile_matches_eager():
    def step(t):
        return logsumexp(t, dim=-1).sum()

    def probe(t):
        return t.sin()

    try:
        torch.compile(probe)(torch.ones(2))
    except Exception as error:  # no C++ compiler or unsupported platform
        pytest.skip(f"torch.compile is unavailable: {type(error).__name__}")
    x = torch.randn(8, 33, dtype=torch.float32)
    x[2] = -INF
    eager, compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    step(eager).backward()
    torch.compile(step)(compiled).backward()
    torch.testing.assert_close(compiled.grad, eager.grad)


# --------------------------------------------------------------------------------------
# logaddexp
# --------------------------------------------------------------------------------------


def float64_pairs(a: torch.Tensor, b: torch.Tensor) -> list[tuple[float, float]]:
    return list(zip(a.double().tolist(), b.double().tolist(), strict=True))


def pairs(seed: int, count: int = 300, scale: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(count, generator=g, dtype=torch.float64) * scale
    b = (
        a
        + torch.randn(count, generator=g, dtype=torch.float64)
        * torch.rand(count, generator=g, dtype=torch.float64)
        * scale
    )
    return a, b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logaddexp_is_within_2_ulp_of_mpmath_and_no_worse_than_torch(dtype):
    a, b = (t.to(dtype) for t in pairs(5))
    rows = [[u, v] for u, v in float64_pairs(a, b)]
    exact = [mp_logsumexp(row) for row in rows]
    keep = without_cancellation(rows, exact)
    if dtype == torch.float32:
        keep[:] = True
    ours = ulp_errors(logaddexp(a, b), exact, dtype)
    theirs = ulp_errors(torch.logaddexp(a, b), exact, dtype)
    assert ours[keep].max() <= 2.0
    assert ours.max() <= max(theirs.max(), 2.0)


def cancelling_pairs(count: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with exp(a) + exp(b) = 1 + O(1e-3), both in (-log 2 - 1e-3, 0): the max and
    log1p(exp(-|a - b|)) cancel to a result ~ 1e-3."""
    g = torch.Generator().manual_seed(13)
    share = torch.rand(count, generator=g, dtype=torch.float64) * 0.98 + 0.01
    offsets = 1e-3 * torch.randn(count, generator=g, dtype=torch.float64)
    return torch.log(share) + offsets, torch.log1p(-share) + offsets


def test_float32_logaddexp_is_within_half_an_ulp_where_the_result_cancels():
    a, b = (t.to(torch.float32) for t in cancelling_pairs())
    # The worst pair of the audit's float32 inputs (PyTorch: 15 ulp).
    a = torch.cat([a, torch.tensor([-0.66771167516708374])])
    b = torch.cat([b, torch.tensor([-0.66771185398101807])])
    exact = [mp_logsumexp([u, v]) for u, v in float64_pairs(a, b)]
    assert ulp_errors(logaddexp(a, b), exact, torch.float32).max() <= 0.51


def test_float64_logaddexp_error_where_the_result_cancels_is_an_ulp_of_log_2():
    a, b = cancelling_pairs()
    exact = [mp_logsumexp([u, v]) for u, v in float64_pairs(a, b)]
    errors = [abs(mpmath.mpf(y) - e) for y, e in zip(logaddexp(a, b).tolist(), exact, strict=True)]
    assert max(errors) <= float64_ulp(math.log(2))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_logaddexp_low_precision_is_one_of_the_two_neighbours(dtype):
    a, b = (t.to(dtype) for t in pairs(6, scale=5.0))
    exact = [mp_logsumexp([u, v]) for u, v in float64_pairs(a, b)]
    assert ulp_errors(logaddexp(a, b), exact, dtype).max() < 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logaddexp_gradients_are_within_4_ulp_of_the_mpmath_sigmoid(dtype):
    a, b = (t.to(dtype).requires_grad_() for t in pairs(7))
    logaddexp(a, b).sum().backward()
    exact_a, exact_b = [], []
    for u, v in float64_pairs(a.detach(), b.detach()):
        exact_a.append(1 / (1 + mpmath.exp(mpmath.mpf(v) - mpmath.mpf(u))))
        exact_b.append(1 / (1 + mpmath.exp(mpmath.mpf(u) - mpmath.mpf(v))))
    assert ulp_errors(a.grad, exact_a, dtype).max() <= 4.0
    assert ulp_errors(b.grad, exact_b, dtype).max() <= 4.0


@pytest.mark.parametrize(
    ("a", "b"),
    [(INF, INF), (INF, -INF), (-INF, -INF), (INF, 1.0), (-INF, 1.0), (NAN, 1.0), (2.0, 2.0)],
)
def test_logaddexp_values_match_torch_at_the_edges(a, b):
    ta, tb = torch.tensor(a), torch.tensor(b)
    torch.testing.assert_close(logaddexp(ta, tb), torch.logaddexp(ta, tb), equal_nan=True)


def test_logaddexp_both_neg_inf_gives_zero_gradients_where_torch_gives_nan():
    a = torch.tensor(-INF, requires_grad=True)
    b = torch.tensor(-INF, requires_grad=True)
    logaddexp(a, b).backward()
    assert a.grad.item() == 0.0 and b.grad.item() == 0.0
    a_torch, b_torch = a.detach().requires_grad_(), b.detach().requires_grad_()
    torch.logaddexp(a_torch, b_torch).backward()
    assert math.isnan(a_torch.grad.item())


def test_logaddexp_broadcasts_and_promotes_like_torch():
    a = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float32)
    assert logaddexp(a, b).dtype == torch.logaddexp(a, b).dtype == torch.float64
    torch.testing.assert_close(logaddexp(a, b), torch.logaddexp(a, b))
    b64 = b.double().requires_grad_()
    assert torch.autograd.gradcheck(logaddexp, (a, b64))


# --------------------------------------------------------------------------------------
# logsubexp
# --------------------------------------------------------------------------------------


def mp_logsubexp(a: float, b: float) -> mpmath.mpf:
    return mpmath.mpf(a) + mp_log1mexp(mpmath.mpf(b) - mpmath.mpf(a))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logsubexp_is_within_2_ulp_of_mpmath(dtype):
    g = torch.Generator().manual_seed(8)
    # a >= 35 > -log1mexp(b - a): the two terms of a + log1mexp(b - a) do not cancel.
    a = torch.randn(300, generator=g, dtype=torch.float64) * 5 + 60
    gap = torch.exp(torch.empty(300, dtype=torch.float64).uniform_(-25, 4, generator=g))
    a, b = a.to(dtype), (a - gap).to(dtype)
    exact = [mp_logsubexp(u, v) for u, v in float64_pairs(a, b)]
    assert ulp_errors(logsubexp(a, b), exact, dtype).max() <= 2.0


def test_float32_logsubexp_is_within_half_an_ulp_where_the_result_cancels():
    g = torch.Generator().manual_seed(14)
    # a in (0, log 2) with exp(a) - exp(b) ~ 1, and a ~ -log(a - b) for tiny gaps
    # (a = 12.48, a - b = 4e-6: the audit's worst pair, 74 ulp before).
    a = torch.rand(100, generator=g, dtype=torch.float64) * 0.6 + 0.05
    b = torch.log(torch.expm1(a)) + 1e-3 * torch.randn(100, generator=g, dtype=torch.float64)
    gaps = torch.exp(torch.empty(100, dtype=torch.float64).uniform_(-16, -3, generator=g))
    a = torch.cat([a, -torch.log(gaps), torch.tensor([12.480912208557129])])
    b = torch.cat([b, -torch.log(gaps) - gaps, torch.tensor([12.480908393859863])])
    a, b = a.to(torch.float32), b.to(torch.float32)
    keep = a > b
    a, b = a[keep], b[keep]
    exact = [mp_logsubexp(u, v) for u, v in float64_pairs(a, b)]
    assert ulp_errors(logsubexp(a, b), exact, torch.float32).max() <= 0.51


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_logsubexp_low_precision_is_one_of_the_two_neighbours(dtype):
    g = torch.Generator().manual_seed(9)
    a = (torch.randn(200, generator=g) * 3 + 10).to(dtype)
    b = (a.float() - torch.rand(200, generator=g) * 5 - 0.05).to(dtype)
    exact = [mp_logsubexp(u, v) for u, v in float64_pairs(a, b)]
    assert ulp_errors(logsubexp(a, b), exact, dtype).max() < 1.0


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (1.5, 1.5, -INF),
        (-INF, -INF, -INF),
        (INF, 3.0, INF),
        (INF, -INF, INF),
        (2.0, -INF, 2.0),
        (1.0, 2.0, NAN),
        (INF, INF, NAN),
        (-INF, 0.0, NAN),
    ],
)
def test_logsubexp_edge_values(a, b, expected):
    value = logsubexp(torch.tensor(a), torch.tensor(b)).item()
    assert value == expected or (math.isnan(value) and math.isnan(expected))


def test_logsubexp_both_neg_inf_has_zero_gradients():
    a = torch.tensor(-INF, requires_grad=True)
    b = torch.tensor(-INF, requires_grad=True)
    logsubexp(a, b).backward()
    assert a.grad.item() == 0.0 and b.grad.item() == 0.0


def test_logsubexp_gradcheck_and_gradients_near_equal_arguments():
    g = torch.Generator().manual_seed(10)
    a = torch.randn(3, 1, generator=g, dtype=torch.float64).add_(5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(logsubexp, (a, b))
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.0 - 1e-12, dtype=torch.float64, requires_grad=True)
    logsubexp(a, b).backward()
    # d/da = 1 / (1 - exp(b - a)), d/db = -exp(b - a) / (1 - exp(b - a)).
    gap = mpmath.mpf(b.item()) - mpmath.mpf(a.item())
    exact_a = 1 / -mpmath.expm1(gap)
    assert ulp_errors(a.grad, [exact_a], torch.float64)[0] <= 4.0
    assert ulp_errors(b.grad, [1 - exact_a], torch.float64)[0] <= 4.0


# --------------------------------------------------------------------------------------
# log1mexp
# --------------------------------------------------------------------------------------


def log1mexp_points(dtype: torch.dtype) -> torch.Tensor:
    """Both sides of the switch at -log 2, the approach to 0 and the far tail."""
    switch = torch.tensor(-math.log(2), dtype=dtype)
    steps = [torch.nextafter(switch, torch.tensor(d, dtype=dtype)) for d in (-1.0, 1.0)]
    g = torch.Generator().manual_seed(11)
    spread = -torch.exp(torch.empty(400, dtype=torch.float64).uniform_(-30, 6.5, generator=g))
    fixed = torch.tensor([-1e-30, -1e-10, -1e-7, -0.5, -1.0, -40.0, -80.0, -100.0])
    return torch.cat(
        [switch.reshape(1), *[s.reshape(1) for s in steps], spread.to(dtype), fixed.to(dtype)]
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log1mexp_is_within_2_ulp_of_mpmath_around_the_switch_and_in_the_tails(dtype):
    x = log1mexp_points(dtype)
    x = x[x < 0]
    exact = [mp_log1mexp(v) for v in x.double().tolist()]
    assert ulp_errors(log1mexp(x), exact, dtype).max() <= 2.0


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_log1mexp_low_precision_is_one_of_the_two_neighbours(dtype):
    x = log1mexp_points(dtype)
    x = x[(x < 0) & (x > -15)]
    exact = [mp_log1mexp(v) for v in x.double().tolist()]
    assert ulp_errors(log1mexp(x), exact, dtype).max() < 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log1mexp_gradient_is_within_4_ulp_of_mpmath(dtype):
    x = log1mexp_points(dtype)
    x = x[x < 0].requires_grad_()
    log1mexp(x).sum().backward()
    exact = []
    for v in x.detach().double().tolist():
        exact.append(-1 / mpmath.expm1(-mpmath.mpf(v)))
    assert ulp_errors(x.grad, exact, dtype).max() <= 4.0


def test_log1mexp_is_finite_where_the_naive_formula_is_not():
    x = torch.tensor([-1e-10, -30.0], dtype=torch.float32)
    naive = torch.log(1 - torch.exp(x))
    assert naive[0].item() == -INF and naive[1].item() == 0.0
    exact = [mp_log1mexp(v) for v in x.double().tolist()]
    assert ulp_errors(log1mexp(x), exact, torch.float32).max() <= 1.0


def test_log1mexp_edge_values_and_gradients():
    x = torch.tensor([0.0, -INF, 0.5, NAN], requires_grad=True)
    value = log1mexp(x)
    value.sum().backward()
    assert value[0].item() == -INF and value[1].item() == 0.0
    assert math.isnan(value[2].item()) and math.isnan(value[3].item())
    assert x.grad[0].item() == -INF and x.grad[1].item() == 0.0
    assert math.isnan(x.grad[2].item()) and math.isnan(x.grad[3].item())


def test_log1mexp_gradcheck():
    x = -torch.rand(20, dtype=torch.float64).mul(5).add(1e-3).requires_grad_()
    assert torch.autograd.gradcheck(log1mexp, (x,))


# --------------------------------------------------------------------------------------
# log1pexp
# --------------------------------------------------------------------------------------

# Mächler's switch points (float64: -37, 18, 33.3), their float32 analogues (log(eps) and
# the root of exp(-x) = x eps / 2), and torch.nn.functional.softplus's threshold of 20.
SWITCH_POINTS = (-37.0, -15.94, 13.997, 18.0, 20.0, 33.3)


def log1pexp_points(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(12)
    spread = torch.empty(500, dtype=torch.float64).uniform_(-110, 110, generator=g)
    near = [torch.linspace(p - 0.5, p + 0.5, 21, dtype=torch.float64) for p in SWITCH_POINTS]
    return torch.cat([spread, *near, torch.tensor([0.0, -1e-30, 1e-30])]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log1pexp_is_within_2_ulp_of_mpmath_across_every_switch_point(dtype):
    x = log1pexp_points(dtype)
    exact = [mp_log1pexp(v) for v in x.double().tolist()]
    assert ulp_errors(log1pexp(x), exact, dtype).max() <= 2.0


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_log1pexp_low_precision_is_one_of_the_two_neighbours(dtype):
    x = log1pexp_points(dtype)
    x = x[x.abs() < 60]
    exact = [mp_log1pexp(v) for v in x.double().tolist()]
    assert ulp_errors(log1pexp(x), exact, dtype).max() < 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log1pexp_gradient_is_within_4_ulp_of_the_mpmath_sigmoid(dtype):
    x = log1pexp_points(dtype).requires_grad_()
    log1pexp(x).sum().backward()
    exact = [1 / (1 + mpmath.exp(-mpmath.mpf(v))) for v in x.detach().double().tolist()]
    assert ulp_errors(x.grad, exact, dtype).max() <= 4.0


def test_log1pexp_has_no_jump_where_torch_softplus_switches_at_20():
    x = torch.tensor([20.0 + 1e-6, 25.0], dtype=torch.float64)
    exact = [mp_log1pexp(v) for v in x.tolist()]
    assert ulp_errors(log1pexp(x), exact, torch.float64).max() <= 1.0
    # softplus returns x above 20, dropping exp(-x) ~ 2e-9: a jump of ~5e5 ulp.
    assert ulp_errors(torch.nn.functional.softplus(x), exact, torch.float64).min() > 1e3


def test_log1pexp_edge_values():
    x = torch.tensor([-INF, INF, NAN, 1e308], dtype=torch.float64, requires_grad=True)
    value = log1pexp(x)
    value.sum().backward()
    assert value[0].item() == 0.0 and value[1].item() == INF and value[3].item() == 1e308
    assert math.isnan(value[2].item())
    assert x.grad[0].item() == 0.0 and x.grad[1].item() == 1.0 and x.grad[3].item() == 1.0


@pytest.mark.parametrize(
    "fn", [log1mexp, log1pexp, lambda t: logaddexp(t, t), lambda t: logsubexp(t, t)]
)
def test_elementwise_functions_reject_integer_input(fn):
    with pytest.raises(TypeError, match="must be a real floating-point tensor"):
        fn(torch.arange(3))


def test_pairwise_functions_reject_shapes_that_do_not_broadcast():
    for fn in (logaddexp, logsubexp):
        with pytest.raises(ValueError, match="do not broadcast"):
            fn(torch.ones(3), torch.ones(4))


@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=20
    ),
    dtype=st.sampled_from(FLOATS),
)
def test_hypothesis_elementwise_finite_in_finite_out(values, dtype):
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    x = x.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).requires_grad_()
    negative = -x.abs() - 1e-3
    outputs = [
        log1pexp(x),
        log1mexp(negative),
        logaddexp(x, x.flip(0)),
        logsubexp(x.abs() + 1, -x.abs()),
    ]
    sum(o.sum() for o in outputs).backward()
    for out in outputs:
        finite_or_large = torch.isfinite(out) | (out == INF)
        assert finite_or_large.all() and out.dtype == dtype
    assert not torch.isnan(x.grad).any()
