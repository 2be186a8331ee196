"""finite.ops.softmax and log_softmax against mpmath (50 digits) and PyTorch.

References are evaluated on the exact values of the rounded inputs. Errors are in ULPs of
the output dtype at the exact value (subnormal spacing below the smallest normal).
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finite.ops import log_softmax, softmax

mpmath.mp.dps = 50
INF = math.inf
NAN = math.nan
LOW_PRECISION = (torch.bfloat16, torch.float16)
FLOATS = (torch.float64, torch.float32, *LOW_PRECISION)
OPS = (softmax, log_softmax)


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------


def mp_log_softmax_row(row: list[float]) -> list:
    """Exact log-softmax of a row of finite or -inf values (-inf entries give -inf)."""
    finite = [mpmath.mpf(v) for v in row if v != -INF]
    top = max(finite)
    # log(count + rest) as log(count) + log1p(rest / count): at 50 digits, log(1 + rest)
    # would keep only 50 - 40 digits of a rest of 1e-40.
    count = sum(v == top for v in finite)
    rest = mpmath.fsum(mpmath.exp(v - top) for v in finite if v != top)
    log_norm = mpmath.log(count) + mpmath.log1p(rest / count)  # minus top
    return [-mpmath.inf if v == -INF else (mpmath.mpf(v) - top) - log_norm for v in row]


def mp_reference(op, x: torch.Tensor) -> list:
    """Exact ``op(x, -1)`` of a 2-d tensor, flattened, as mpmath numbers."""
    exact = []
    for row in x.double().tolist():
        log_p = mp_log_softmax_row(row)
        exact += [mpmath.exp(v) for v in log_p] if op is softmax else log_p
    return exact


def ulp_errors(actual: torch.Tensor, exact: list, dtype: torch.dtype) -> np.ndarray:
    """Error of each element of ``actual`` in ULPs of ``dtype`` at the exact value."""
    info = torch.finfo(dtype)
    mantissa_bits = -int(math.log2(info.eps))
    min_exponent = int(math.log2(info.tiny))
    # Beyond max + ulp(max) / 2 a value rounds to infinity.
    overflow = info.max * (1 + info.eps / 2)
    errors = []
    for value, ref in zip(actual.double().flatten().tolist(), exact, strict=True):
        if mpmath.isfinite(ref) and abs(ref) >= overflow:
            ref = mpmath.inf if ref > 0 else -mpmath.inf
        if not math.isfinite(value) or not mpmath.isfinite(ref):
            errors.append(0.0 if value == ref else INF)
            continue
        exponent = mpmath.frexp(ref)[1] - 1 if ref != 0 else min_exponent
        spacing = mpmath.ldexp(1, max(exponent, min_exponent) - mantissa_bits)
        errors.append(float(abs(mpmath.mpf(value) - ref) / spacing))
    return np.array(errors)


def hard_rows(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows at several scales, near-ties, huge spreads and a confident row, width 12."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(6, 12, generator=g, dtype=torch.float64) * s for s in (1, 10, 100)]
    base = torch.randn(2, 12, generator=g, dtype=torch.float64) * 3
    near_ties = base[:, :1] + torch.randn(2, 12, generator=g, dtype=torch.float64) * 1e-6
    confident = torch.full((2, 12), -30.0, dtype=torch.float64)
    confident[:, 0] = 0.0
    confident[1, 1:] = -80.0
    spread = torch.linspace(-1e4, 1e4, 12, dtype=torch.float64)[None].repeat(2, 1)
    tiny = torch.full((1, 12), 1e-40, dtype=torch.float64) * torch.arange(12)
    return torch.cat([*rows, near_ties, confident, spread, tiny]).to(dtype)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


# --------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_float32_is_within_one_ulp_of_mpmath(op):
    x = hard_rows(torch.float32)
    errors = ulp_errors(op(x, -1), mp_reference(op, x), torch.float32)
    assert errors.max() <= 1.0


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_float64_is_within_two_ulp_of_mpmath(op):
    x = hard_rows(torch.float64, seed=1)
    errors = ulp_errors(op(x, -1), mp_reference(op, x), torch.float64)
    assert errors.max() <= 2.0


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_low_precision_is_within_one_ulp_of_mpmath(op, dtype):
    x = hard_rows(dtype, seed=2)
    y = op(x, -1)
    assert y.dtype == dtype
    assert ulp_errors(y, mp_reference(op, x), dtype).max() <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_never_less_accurate_than_torch(op, dtype):
    x = hard_rows(dtype, seed=3)
    exact = mp_reference(op, x)
    ours = ulp_errors(op(x, -1), exact, dtype).max()
    theirs = ulp_errors(getattr(torch, op.__name__)(x, -1), exact, dtype).max()
    assert ours <= theirs


def test_log_softmax_keeps_the_digits_of_a_confident_row():
    x = torch.tensor([0.0, -30.0])
    exact = mp_log_softmax_row([0.0, -30.0])
    assert ulp_errors(log_softmax(x, 0), exact, torch.float32).max() <= 0.5
    assert log_softmax(x, 0)[0] < 0  # torch.log_softmax rounds it to 0


def test_bfloat16_log_softmax_is_not_rounded_through_a_bfloat16_sum():
    x = torch.tensor([[3.0, 2.5, -1.0, 0.75]], dtype=torch.bfloat16)
    exact = mp_reference(log_softmax, x)
    assert ulp_errors(log_softmax(x, -1), exact, torch.bfloat16).max() <= 0.5


# --------------------------------------------------------------------------------------
# PyTorch semantics: shapes, dims, dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -3])
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_matches_torch_along_every_dim_in_float64(op, dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y = op(x, dim)
    torch.testing.assert_close(y, getattr(torch, op.__name__)(x, dim), rtol=1e-14, atol=0)
    assert y.shape == x.shape and y.is_contiguous()


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_zero_dim_input_is_one_class(op):
    assert op(torch.tensor(3.0), 0).item() == (1.0 if op is softmax else 0.0)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_empty_input_gives_empty_output(op):
    x = torch.empty(0, 5, requires_grad=True)
    y = op(x, -1)
    y.sum().backward()
    assert y.shape == (0, 5) and x.grad.shape == (0, 5)


# --------------------------------------------------------------------------------------
# Masks and edge rows
# --------------------------------------------------------------------------------------


def test_masked_softmax_is_the_softmax_of_the_kept_entries():
    x = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.4
    mask[:, 0] = True
    y = softmax(x, -1, mask=mask)
    for row, keep, out in zip(x, mask, y, strict=True):
        torch.testing.assert_close(out[keep], torch.softmax(row[keep], 0), rtol=1e-14, atol=0)
        assert (out[~keep] == 0).all()


def test_masked_log_softmax_is_the_log_softmax_of_the_kept_entries():
    x = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.4
    mask[:, 0] = True
    y = log_softmax(x, -1, mask=mask)
    for row, keep, out in zip(x, mask, y, strict=True):
        expected = torch.log_softmax(row[keep], 0)
        torch.testing.assert_close(out[keep], expected, rtol=1e-14, atol=0)
        assert (out[~keep] == -INF).all()


def test_mask_broadcasts_like_an_attention_mask():
    scores = torch.randn(2, 3, 5, 5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    y = softmax(scores, -1, mask=causal)
    expected = torch.softmax(scores.masked_fill(~causal, -INF), -1)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_masked_entries_ignore_their_values_even_nan(op):
    x = torch.tensor([[1.0, NAN, INF, 2.0]])
    mask = torch.tensor([True, False, False, True])
    y = op(x, -1, mask=mask)
    expected = op(torch.tensor([[1.0, -INF, -INF, 2.0]]), -1)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_fully_masked_row_gives_zeros_or_minus_inf_and_zero_gradient(op):
    x = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True] * 4, [False] * 4])
    y = op(x, -1, mask=mask)
    empty = 0.0 if op is softmax else -INF
    assert (y[1] == empty).all() and not y[0].isnan().any()
    y[0].sum().backward(retain_graph=True)
    y.backward(torch.randn(2, 4))
    assert (x.grad[1] == 0).all() and x.grad.isfinite().all()


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_all_minus_inf_row_behaves_like_a_fully_masked_row(op):
    x = torch.full((1, 3), -INF)
    expected = 0.0 if op is softmax else -INF
    assert (op(x, -1) == expected).all()


def test_softmax_of_an_all_minus_inf_row_has_zero_gradient():
    x = torch.full((1, 3), -INF, requires_grad=True)
    softmax(x, -1).backward(torch.ones(1, 3))
    assert (x.grad == 0).all()


def test_single_plus_inf_takes_all_the_probability():
    x = torch.tensor([[1.0, INF, 1e30]])
    assert softmax(x, -1).tolist() == [[0.0, 1.0, 0.0]]
    assert log_softmax(x, -1).tolist() == [[-INF, 0.0, -INF]]


def test_several_plus_inf_share_the_probability():
    x = torch.tensor([[INF, 0.0, INF, INF]])
    torch.testing.assert_close(softmax(x, -1), torch.tensor([[1 / 3, 0.0, 1 / 3, 1 / 3]]))
    log_third = -math.log(3)
    torch.testing.assert_close(
        log_softmax(x, -1), torch.tensor([[log_third, -INF, log_third, log_third]])
    )


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_nan_that_takes_part_makes_the_row_nan(op):
    x = torch.tensor([[1.0, NAN, 2.0], [1.0, 2.0, 3.0]])
    y = op(x, -1)
    assert y[0].isnan().all() and not y[1].isnan().any()


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_gradcheck_in_float64(op):
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6) > 0.3
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda t: op(t, 1), (x,))
    # Masked log-probabilities are -inf, where finite differences are NaN: compare the
    # kept outputs only (the masked inputs must still get exactly zero gradient).
    assert torch.autograd.gradcheck(lambda t: op(t, -1, mask=mask).masked_fill(~mask, 0), (x,))


def one_hot_upstream(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A one-hot cotangent per row at a random class of probability at most 1/2 (so
    the gradient is a well-conditioned column of the Jacobian, as in the audit)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(x.double(), dim=-1)
    weights = torch.where(probs <= 0.5, 1.0, 0.0).double()
    classes = torch.multinomial(weights, 1, generator=g).squeeze(-1)
    return torch.nn.functional.one_hot(classes, x.shape[-1]).to(x.dtype)


def mp_gradient(op, x: torch.Tensor, upstream: torch.Tensor) -> list:
    """Exact gradient of ``sum(upstream * op(x, -1))`` for 2-d ``x``, flattened."""
    exact = []
    for row, g_row in zip(x.double().tolist(), upstream.double().tolist(), strict=True):
        p = [mpmath.exp(v) for v in mp_log_softmax_row(row)]
        g = [mpmath.mpf(v) for v in g_row]
        if op is softmax:
            dot = mpmath.fsum(gi * pi for gi, pi in zip(g, p, strict=True))
            exact += [pi * (gi - dot) for gi, pi in zip(g, p, strict=True)]
        else:
            total = mpmath.fsum(g)
            exact += [gi - pi * total for gi, pi in zip(g, p, strict=True)]
    return exact


def gradient_of(op, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_()
    op(leaf, -1).backward(upstream)
    return leaf.grad


@pytest.mark.parametrize(
    ("dtype", "units"),
    [(torch.float64, 4.0), (torch.float32, 4.0), *[(d, 1.0) for d in LOW_PRECISION]],
    ids=str,
)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_gradient_is_within_the_ulp_target_of_mpmath(op, dtype, units):
    # Rows whose small probabilities come from large |x - max|: the gradient of a
    # log-probability of -80 must not be exp of that log-probability rounded to dtype.
    x = hard_rows(dtype, seed=6)
    upstream = one_hot_upstream(x, seed=7)
    grad = gradient_of(op, x, upstream)
    assert grad.dtype == dtype
    assert ulp_errors(grad, mp_gradient(op, x, upstream), dtype).max() <= units


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_gradient_of_a_row_with_plus_inf_entries_is_that_of_their_shared_limit(op, dtype):
    # k +inf entries take probability 1/k each: the gradient is the softmax Jacobian at
    # p = (1/2, 0, 1/2, 0), from plain float64 arithmetic.
    x = torch.tensor([[INF, 1.0, INF, 0.0], [0.5, -1.0, 2.0, 0.25]], dtype=dtype)
    upstream = torch.tensor([[1.0, 2.0, -0.5, 0.25], [1.0, 0.0, 0.0, 0.0]], dtype=dtype)
    grad = gradient_of(op, x, upstream)
    p = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64)
    g = upstream[0].double()
    expected = p * (g - (g * p).sum()) if op is softmax else g - p * g.sum()
    assert torch.equal(grad[0].double(), expected)
    assert grad[1].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_log_softmax_gradient_beats_torch_where_its_output_is_very_negative(dtype):
    x = torch.tensor([[0.0, -20.0, -45.5, -80.25, -3.0]], dtype=dtype)
    upstream = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]], dtype=dtype)
    exact = mp_gradient(log_softmax, x, upstream)
    ours = ulp_errors(gradient_of(log_softmax, x, upstream), exact, dtype).max()
    theirs = ulp_errors(gradient_of(torch.log_softmax, x, upstream), exact, dtype).max()
    assert ours <= (4.0 if dtype == torch.float32 else 1.0) < theirs


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_gradient_matches_float64_autograd(op, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(8, 16, generator=g) * 3).to(dtype)
    upstream = torch.randn(8, 16, generator=g).to(dtype)
    leaf = x.clone().requires_grad_()
    op(leaf, -1).backward(upstream)
    ref_leaf = x.double().requires_grad_()
    getattr(torch, op.__name__)(ref_leaf, -1).backward(upstream.double())
    # Elementwise the gradient cancels (g - sum(g * y)); bound the error by a few ulp of
    # the largest entry, as for PyTorch's own kernel.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(
        leaf.grad.double(), ref_leaf.grad, rtol=2 * eps, atol=8 * eps * ref_leaf.grad.abs().max()
    )
    assert leaf.grad.dtype == dtype


# --------------------------------------------------------------------------------------
# Property-based
# --------------------------------------------------------------------------------------

DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])
VALUES = st.one_of(
    st.floats(-30, 30),
    st.sampled_from([0.0, 1e-40, -1e-40, 1e4, -1e4, 6e4, -6e4, -INF]),
)


@st.composite
def inputs(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dtype = draw(DTYPES)
    n = math.prod(shape)
    values = draw(st.lists(VALUES, min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    mask = None
    if draw(st.booleans()):
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        mask = torch.tensor(bits).reshape(shape)
    return x, dim, mask


def _exact_rows(op, x, dim, mask) -> list:
    """mpmath ``op`` of the kept entries, dim moved last; empty rows give 0 / -inf."""
    xm = x.double() if mask is None else x.double().masked_fill(~mask, -INF)
    exact = []
    for row in as_rows(xm.movedim(dim, -1)).tolist():
        if all(v == -INF for v in row):
            exact += [mpmath.mpf(0) if op is softmax else -mpmath.inf] * len(row)
        else:
            exact += mp_reference(op, torch.tensor([row], dtype=torch.float64))
    return exact


@settings(max_examples=60, deadline=None)
@given(inputs(), st.sampled_from(OPS))
def test_random_inputs_are_accurate_and_never_nan(case, op):
    x, dim, mask = case
    y = op(x, dim, mask=mask)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not y.isnan().any()
    ours = as_rows(y.movedim(dim, -1))
    errors = ulp_errors(ours, _exact_rows(op, x, dim, mask), x.dtype)
    assert errors.max() <= (2.0 if x.dtype == torch.float64 else 1.0)


@settings(max_examples=40, deadline=None)
@given(inputs())
def test_softmax_rows_sum_to_one_or_zero_when_empty(case):
    x, dim, mask = case
    y = softmax(x, dim, mask=mask).double()
    totals = as_rows(y.movedim(dim, -1)).sum(-1)
    xm = x if mask is None else x.masked_fill(~mask, -INF)
    empty = (as_rows(xm.movedim(dim, -1)) == -INF).all(-1)
    n = x.shape[dim] if x.ndim else 1
    tol = n * torch.finfo(x.dtype).eps
    assert (totals[empty] == 0).all()
    assert ((totals[~empty] - 1).abs() <= tol).all()


@st.composite
def offset_rows(draw):
    """float32 rows around an offset of up to 1e6 in magnitude, at a spread from
    near-uniform to confident, optionally with one confident row among them."""
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(2, 16))
    offset = draw(st.one_of(st.floats(-6000, 6000), st.floats(-1e6, 1e6)))
    scale = draw(st.floats(0.01, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = offset + scale * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        x = torch.cat([x, torch.tensor([[offset] + [offset - 40.0] * (cols - 1)])])
    return x.float()


@settings(max_examples=40, deadline=None)
@given(offset_rows())
def test_float32_log_softmax_is_within_one_ulp_at_any_offset_and_spread(x):
    errors = ulp_errors(log_softmax(x, -1), mp_reference(log_softmax, x), torch.float32)
    assert errors.max() <= 1.0


@settings(max_examples=40, deadline=None)
@given(offset_rows(), st.integers(0, 2**31))
def test_float32_log_softmax_gradient_is_within_the_ulp_target_at_any_offset(x, seed):
    upstream = one_hot_upstream(x, seed)
    grad = gradient_of(log_softmax, x, upstream)
    assert ulp_errors(grad, mp_gradient(log_softmax, x, upstream), torch.float32).max() <= 4.0


def test_float32_log_softmax_gradient_at_a_near_certain_class_keeps_its_digits():
    # Upstream 1 at a class of probability about 1 - 2**-24, beside a spread row:
    # 1 - p must come out of a p accurate to far better than 2**-24.
    x = torch.tensor([[4000.0, 4000 - 24 * math.log(2.0)], [4000.5, 3999.75]])
    upstream = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    grad = gradient_of(log_softmax, x, upstream)
    exact = mp_gradient(log_softmax, x, upstream)
    assert ulp_errors(grad, exact, torch.float32).max() <= 4.0


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_non_float_input_raises_type_error_naming_x(op, dtype):
    with pytest.raises(TypeError, match="x"):
        op(torch.zeros(3, dtype=dtype), 0)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_dim_out_of_range_raises_value_error(op):
    with pytest.raises(ValueError, match="dim"):
        op(torch.zeros(2, 3), 2)
    with pytest.raises(TypeError, match="dim"):
        op(torch.zeros(2, 3), 1.0)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_non_bool_mask_raises_type_error(op):
    with pytest.raises(TypeError, match="mask"):
        op(torch.zeros(2, 3), -1, mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="mask"):
        op(torch.zeros(2, 3), -1, mask=[True, False, True])


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_mask_that_does_not_broadcast_raises_value_error(op):
    with pytest.raises(ValueError, match="mask"):
        op(torch.zeros(2, 3), -1, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        op(torch.zeros(3), -1, mask=torch.ones(2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------
# Autocast and devices
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_compiled_graph_matches_eager(op, dtype):
    # aot_eager traces forward and backward like inductor, without compiling kernels.
    x = (torch.randn(4, 7, generator=torch.Generator().manual_seed(8)) * 3).to(dtype)
    mask = torch.arange(7) < 5

    def fn(t):
        return op(t, -1, mask=mask).masked_fill(~mask, 0)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager_leaf, compiled_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, result = fn(eager_leaf), compiled(compiled_leaf)
    eager.sum().backward()
    result.sum().backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_works_under_cpu_autocast(op):
    layer = torch.nn.Linear(8, 6)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = layer(x)
        y = op(scores, -1)
    assert y.dtype == scores.dtype == torch.bfloat16
    exact = mp_reference(op, scores.detach())
    assert ulp_errors(y, exact, torch.bfloat16).max() <= 1.0
    y.float().sum().backward()
    assert layer.weight.grad.isfinite().all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_cuda_matches_cpu(op, dtype):
    x = (torch.randn(64, 300) * 8).to(dtype)
    mask = torch.rand(64, 300) > 0.2
    mask[3] = False
    upstream = torch.randn(64, 300).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        leaf = x.to(device).detach().requires_grad_()
        y = op(leaf, -1, mask=mask.to(device))
        y.backward(upstream.to(device))
        results.append((y.cpu(), leaf.grad.cpu()))
    (y_cpu, g_cpu), (y_cuda, g_cuda) = results
    # Each is within 2 ulp of the exact value (CUDA's exp differs from CPU's in the last
    # bits); gradients cancel elementwise, so compare them at the scale of the largest.
    info = torch.finfo(dtype)
    torch.testing.assert_close(y_cuda, y_cpu, rtol=4 * info.eps, atol=info.tiny * info.eps)
    scale = g_cpu.abs().max().item()
    torch.testing.assert_close(g_cuda, g_cpu, rtol=4 * info.eps, atol=8 * info.eps * scale)
