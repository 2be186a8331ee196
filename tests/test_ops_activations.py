"""finite.ops activations against mpmath (50 digits) and PyTorch.

References are computed on the exact values of the rounded inputs; errors are in ULPs of
the output dtype at the exact value (subnormal spacing below the smallest normal).
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finite.ops import log1pexp, log_sigmoid, sigmoid, softcap, softplus

mpmath.mp.dps = 50
INF = math.inf
NAN = math.nan
FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def ulp_errors(actual: torch.Tensor, exact: list, dtype: torch.dtype) -> np.ndarray:
    """Error of each element of ``actual`` in ULPs of ``dtype`` at the exact value."""
    info = torch.finfo(dtype)
    mantissa_bits = -int(math.log2(info.eps))
    min_exponent = int(math.log2(info.tiny))
    errors = []
    for value, ref in zip(actual.double().flatten().tolist(), exact, strict=True):
        if not math.isfinite(value):
            errors.append(0.0 if value == ref else INF)
            continue
        exponent = mpmath.frexp(ref)[1] - 1 if ref != 0 else min_exponent
        spacing = mpmath.ldexp(1, max(exponent, min_exponent) - mantissa_bits)
        errors.append(float(abs(mpmath.mpf(value) - ref) / spacing))
    return np.array(errors)


def mp_sigmoid(x: float) -> mpmath.mpf:
    return 1 / (1 + mpmath.exp(-mpmath.mpf(x)))


def mp_sigmoid_slope(x: float) -> mpmath.mpf:
    e = mpmath.exp(-abs(mpmath.mpf(x)))
    return e / (1 + e) ** 2


def mp_log_sigmoid(x: float) -> mpmath.mpf:
    return -mpmath.log1p(mpmath.exp(-mpmath.mpf(x)))


def points(dtype: torch.dtype, low: float, high: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wide = torch.empty(500, dtype=torch.float64).uniform_(low, high, generator=g)
    near_zero = torch.empty(200, dtype=torch.float64).uniform_(-4, 4, generator=g)
    return torch.cat([wide, near_zero, torch.tensor([0.0, 1e-30, -1e-30])]).to(dtype)


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    fn(x).sum().backward()
    return x.grad


# --------------------------------------------------------------------------------------
# sigmoid
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sigmoid_is_within_2_ulp_of_mpmath_in_both_tails(dtype):
    x = points(dtype, -110, 110, seed=1)
    exact = [mp_sigmoid(v) for v in x.double().tolist()]
    assert ulp_errors(sigmoid(x), exact, dtype).max() <= 2.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sigmoid_gradient_is_within_4_ulp_of_mpmath(dtype):
    x = points(dtype, -110, 110, seed=2)
    exact = [mp_sigmoid_slope(v) for v in x.double().tolist()]
    assert ulp_errors(grad_of(sigmoid, x), exact, dtype).max() <= 4.0


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_sigmoid_low_precision_is_one_of_the_two_neighbours(dtype):
    x = points(dtype, -30, 30, seed=3)
    exact = [mp_sigmoid(v) for v in x.double().tolist()]
    assert ulp_errors(sigmoid(x), exact, dtype).max() < 1.0


def test_sigmoid_reaches_float32_subnormals_where_torch_gives_zero():
    x = torch.tensor([-90.0, -100.0])
    exact = [mp_sigmoid(v) for v in x.tolist()]
    assert ulp_errors(sigmoid(x), exact, torch.float32).max() <= 1.0
    assert torch.sigmoid(x).eq(0).all()


def test_sigmoid_gradient_is_accurate_where_torch_gives_zero():
    x = torch.tensor([20.0, 40.0, 80.0])
    exact = [mp_sigmoid_slope(v) for v in x.tolist()]
    assert ulp_errors(grad_of(sigmoid, x), exact, torch.float32).max() <= 2.0
    # y * (1 - y) with y rounded to 1.
    assert grad_of(torch.sigmoid, x).eq(0).all()


def test_sigmoid_edge_values():
    x = torch.tensor([-INF, INF, NAN])
    assert sigmoid(x)[:2].tolist() == [0.0, 1.0] and math.isnan(sigmoid(x)[2].item())
    g = grad_of(sigmoid, x)
    assert g[:2].tolist() == [0.0, 0.0] and math.isnan(g[2].item())


# --------------------------------------------------------------------------------------
# log_sigmoid
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_sigmoid_is_within_2_ulp_of_mpmath_and_no_worse_than_torch(dtype):
    x = points(dtype, -110, 110, seed=4)
    exact = [mp_log_sigmoid(v) for v in x.double().tolist()]
    ours = ulp_errors(log_sigmoid(x), exact, dtype)
    theirs = ulp_errors(torch.nn.functional.logsigmoid(x), exact, dtype)
    assert ours.max() <= 2.0
    # The same formula as PyTorch's; the two differ by the last-bit rounding of exp and
    # log1p, never by more than half an ulp in the maximum.
    assert ours.max() <= theirs.max() + 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_sigmoid_gradient_is_the_sigmoid_of_minus_x_within_4_ulp(dtype):
    x = points(dtype, -110, 110, seed=5)
    exact = [mp_sigmoid(-v) for v in x.double().tolist()]
    assert ulp_errors(grad_of(log_sigmoid, x), exact, dtype).max() <= 4.0


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_log_sigmoid_low_precision_is_one_of_the_two_neighbours(dtype):
    x = points(dtype, -40, 40, seed=6)
    exact = [mp_log_sigmoid(v) for v in x.double().tolist()]
    assert ulp_errors(log_sigmoid(x), exact, dtype).max() < 1.0


def test_log_sigmoid_edge_values():
    x = torch.tensor([-INF, INF, NAN], dtype=torch.float64)
    y = log_sigmoid(x)
    assert y[0].item() == -INF and y[1].item() == 0.0 and math.isnan(y[2].item())
    g = grad_of(log_sigmoid, x)
    assert g[0].item() == 1.0 and g[1].item() == 0.0


# --------------------------------------------------------------------------------------
# softplus
# --------------------------------------------------------------------------------------


def test_softplus_with_default_beta_is_log1pexp():
    x = torch.randn(100, dtype=torch.float64) * 30
    assert torch.equal(softplus(x), log1pexp(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_softplus_with_beta_is_within_2_ulp_of_mpmath(dtype, beta):
    # Powers of two, so beta * x is exact and the reference sees the same argument.
    x = points(dtype, -60, 60, seed=7)
    exact = [mpmath.log1p(mpmath.exp(beta * mpmath.mpf(v))) / beta for v in x.double().tolist()]
    assert ulp_errors(softplus(x, beta), exact, dtype).max() <= 2.0
    exact_slope = [mp_sigmoid(beta * v) for v in x.double().tolist()]
    assert ulp_errors(grad_of(lambda t: softplus(t, beta), x), exact_slope, dtype).max() <= 4.0


def test_softplus_has_no_jump_where_torch_switches_to_x():
    # torch.nn.functional.softplus returns x once beta * x > 20 (threshold=20): just above
    # the switch it drops exp(-20) ~ 2e-9, ~5e5 float64 ulp. Ours has no switch.
    x = torch.tensor([19.999, 20.001, 21.0, 30.0], dtype=torch.float64)
    exact = [mpmath.log1p(mpmath.exp(mpmath.mpf(v))) for v in x.tolist()]
    assert ulp_errors(softplus(x), exact, torch.float64).max() <= 1.0
    theirs = ulp_errors(torch.nn.functional.softplus(x), exact, torch.float64)
    assert theirs[0] <= 1.0 and theirs[1] > 1e5 and theirs[1:].min() > 10


def test_softplus_does_not_overflow_for_a_huge_beta():
    x = torch.tensor([-1e10, 1e10, 3.0], dtype=torch.float32)
    y = softplus(x, beta=1e30)
    assert y.tolist() == [0.0, 1e10, 3.0]
    assert torch.isfinite(grad_of(lambda t: softplus(t, beta=1e30), x)).all()


@pytest.mark.parametrize(
    ("beta", "error"),
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (INF, ValueError),
        (NAN, ValueError),
        ("1", TypeError),
        (True, TypeError),
        (torch.tensor(1.0), TypeError),
    ],
)
def test_softplus_rejects_a_bad_beta(beta, error):
    with pytest.raises(error, match="beta must be a positive finite float"):
        softplus(torch.ones(2), beta)


# --------------------------------------------------------------------------------------
# softcap
# --------------------------------------------------------------------------------------


def mp_softcap(x: float, cap: float) -> mpmath.mpf:
    return cap * mpmath.tanh(mpmath.mpf(x) / cap)


def mp_softcap_slope(x: float, cap: float) -> mpmath.mpf:
    return 1 / mpmath.cosh(mpmath.mpf(x) / cap) ** 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cap", [1.0, 0.25])
def test_softcap_is_within_2_ulp_of_mpmath_when_x_over_cap_is_exact(dtype, cap):
    # With a power-of-two cap, x / cap is exact; for other caps its rounding adds up to
    # half an ulp, as in PyTorch's cap * tanh(x / cap) (see the next test).
    x = points(dtype, -6 * cap, 6 * cap, seed=8)
    exact = [mp_softcap(v, cap) for v in x.double().tolist()]
    assert ulp_errors(softcap(x, cap), exact, dtype).max() <= 2.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cap", [30.0, 50.0])
def test_softcap_matches_torch_accuracy_for_any_cap(dtype, cap):
    x = points(dtype, -6 * cap, 6 * cap, seed=9)
    exact = [mp_softcap(v, cap) for v in x.double().tolist()]
    ours = ulp_errors(softcap(x, cap), exact, dtype)
    theirs = ulp_errors(cap * torch.tanh(x / cap), exact, dtype)
    assert ours.max() <= max(theirs.max(), 2.0) <= 2.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cap", [1.0, 30.0])
def test_softcap_gradient_is_within_4_ulp_of_mpmath_for_x_within_2_caps(dtype, cap):
    x = points(dtype, -2 * cap, 2 * cap, seed=10)
    exact = [mp_softcap_slope(v, cap) for v in x.double().tolist()]
    assert ulp_errors(grad_of(lambda t: softcap(t, cap), x), exact, dtype).max() <= 4.0


def test_softcap_gradient_keeps_its_digits_where_torch_gives_zero():
    x = torch.tensor([300.0, 500.0, -700.0])
    exact = [mp_softcap_slope(v, 30.0) for v in x.tolist()]
    ours = ulp_errors(grad_of(lambda t: softcap(t, 30.0), x), exact, torch.float32)
    assert ours.max() <= 1.0
    assert grad_of(lambda t: 30.0 * torch.tanh(t / 30.0), x).eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cap", [30.0, 0.7])
def test_softcap_gradient_is_within_4_ulp_of_mpmath_far_beyond_the_cap(dtype, cap):
    # The slope decays like exp(-2 |x| / cap): the rounding of x / cap alone would cost
    # about |x| / cap ulp (hundreds at 300 caps).
    x = points(dtype, -300 * cap, 300 * cap, seed=12)
    exact = [mp_softcap_slope(v, cap) for v in x.double().tolist()]
    assert ulp_errors(grad_of(lambda t: softcap(t, cap), x), exact, dtype).max() <= 4.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cap", [30.0, 0.7])
def test_softcap_is_within_2_ulp_of_mpmath_for_any_cap(dtype, cap):
    x = points(dtype, -6 * cap, 6 * cap, seed=13)
    exact = [mp_softcap(v, cap) for v in x.double().tolist()]
    assert ulp_errors(softcap(x, cap), exact, dtype).max() <= 2.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softcap_of_tiny_and_subnormal_input_is_within_half_an_ulp(dtype):
    # x / cap rounds a subnormal x to the subnormal spacing; softcap(x) = x (1 - u**2 / 3)
    # is x itself to within far less than an ulp.
    tiny = torch.finfo(dtype).tiny
    magnitudes = torch.tensor([1, 3, 7, 12345, 2**20 + 1], dtype=torch.float64)
    x = torch.cat([magnitudes * tiny * 2.0**-30, magnitudes * tiny, magnitudes * 1e-12])
    x = torch.cat([x, -x]).to(dtype)
    exact = [mp_softcap(v, 30.0) for v in x.double().tolist()]
    assert ulp_errors(softcap(x, 30.0), exact, dtype).max() <= 0.5


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_softcap_low_precision_is_one_of_the_two_neighbours(dtype):
    x = points(dtype, -150, 150, seed=11)
    exact = [mp_softcap(v, 30.0) for v in x.double().tolist()]
    assert ulp_errors(softcap(x, 30.0), exact, dtype).max() < 1.0


def test_softcap_edge_values():
    x = torch.tensor([-INF, INF, NAN, 0.0])
    y = softcap(x, 50.0)
    assert y[0].item() == -50.0 and y[1].item() == 50.0 and math.isnan(y[2].item())
    assert y[3].item() == 0.0
    g = grad_of(lambda t: softcap(t, 50.0), x)
    assert g[0].item() == 0.0 and g[1].item() == 0.0 and g[3].item() == 1.0


@pytest.mark.parametrize(
    ("cap", "error"),
    [
        (0.0, ValueError),
        (-30.0, ValueError),
        (INF, ValueError),
        (NAN, ValueError),
        (None, TypeError),
        (False, TypeError),
    ],
)
def test_softcap_rejects_a_bad_cap(cap, error):
    with pytest.raises(error, match="cap must be a positive finite float"):
        softcap(torch.ones(2), cap)


# --------------------------------------------------------------------------------------
# Shared behaviour
# --------------------------------------------------------------------------------------

ACTIVATIONS = {
    "sigmoid": sigmoid,
    "log_sigmoid": log_sigmoid,
    "softplus": lambda t: softplus(t, 1.5),
    "softcap": lambda t: softcap(t, 30.0),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_output_and_gradient_dtype_equal_input_dtype(name, dtype):
    x = torch.randn(5).to(dtype)
    assert ACTIVATIONS[name](x).dtype == dtype
    assert grad_of(ACTIVATIONS[name], x).dtype == dtype


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gradcheck_float64(name):
    x = (torch.randn(20, dtype=torch.float64) * 5).requires_grad_()
    assert torch.autograd.gradcheck(ACTIVATIONS[name], (x,))


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("bad", [torch.arange(3), torch.ones(2, dtype=torch.bool), [1.0]])
def test_non_float_input_raises_type_error_naming_x(name, bad):
    with pytest.raises(TypeError, match="x must be"):
        ACTIVATIONS[name](bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_compiled_graph_matches_eager(name):
    # aot_eager traces forward and backward like inductor, without compiling kernels.
    fn = ACTIVATIONS[name]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x = points(torch.float32, -100, 100, seed=14)
    eager_leaf, compiled_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, result = fn(eager_leaf), compiled(compiled_leaf)
    eager.sum().backward()
    result.sum().backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_works_under_cpu_autocast(name, dtype):
    x = torch.randn(4, 3).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ACTIVATIONS[name](x)
        g = grad_of(ACTIVATIONS[name], x)
    assert y.dtype == dtype and torch.isfinite(g).all()


@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20),
    dtype=st.sampled_from(FLOATS),
    name=st.sampled_from(sorted(ACTIVATIONS)),
)
def test_hypothesis_finite_input_gives_finite_output_and_gradient(values, dtype, name):
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    x = x.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
    y = ACTIVATIONS[name](x)
    assert torch.isfinite(y).all()
    assert torch.isfinite(grad_of(ACTIVATIONS[name], x)).all()
