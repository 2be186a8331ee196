"""Specification of ``finite.ops`` safe elementary ops: safe_sqrt, safe_log, safe_div.

References are independent of the code under test: PyTorch's own ``sqrt``/``log``/
division in float64, hand-derived derivatives, and ``torch.autograd.gradcheck``.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finite.ops import safe_div, safe_log, safe_sqrt

LOW = [torch.bfloat16, torch.float16]
FLOATS = [torch.float32, torch.float64, *LOW]


def rounded_once(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 reference rounded to ``dtype`` (what 'computed, then rounded once' means)."""
    return reference.to(dtype)


def extreme_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    smallest_subnormal = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    values = [0.0, -0.0, info.tiny, smallest_subnormal.item(), info.max, -info.max, 1.0, -1.0]
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------------
# safe_sqrt
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_safe_sqrt_is_sqrt_of_the_positive_part(dtype):
    x = torch.tensor([-4.0, -1e-30, 0.0, 1e-30, 2.0, 1e30, math.inf], dtype=torch.float64)
    x = x.to(dtype)
    expected = rounded_once(torch.sqrt(x.double().clamp(min=0)), dtype)
    assert torch.equal(safe_sqrt(x), expected)


def test_safe_sqrt_propagates_nan():
    x = torch.tensor([math.nan], requires_grad=True)
    y = safe_sqrt(x)
    y.backward(torch.ones(1))
    assert torch.isnan(y).all() and torch.isnan(x.grad).all()


@pytest.mark.parametrize("dtype", FLOATS)
def test_safe_sqrt_gradient_is_finite_at_every_edge(dtype):
    x = torch.cat([extreme_values(dtype), torch.tensor([-math.inf, math.inf], dtype=dtype)])
    x.requires_grad_()
    safe_sqrt(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    positive = x.detach().double() > 0
    expected = torch.where(positive, 0.5 / x.detach().double().sqrt(), 0.0)
    torch.testing.assert_close(x.grad.double(), expected, rtol=torch.finfo(dtype).eps, atol=0)
    assert (x.grad[~positive] == 0).all()


def test_safe_sqrt_passes_gradcheck_away_from_zero():
    x = (torch.rand(20, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(safe_sqrt, (x,))


def test_safe_sqrt_rejects_integer_input():
    with pytest.raises(TypeError, match="x"):
        safe_sqrt(torch.ones(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------
# safe_log
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_safe_log_default_floor_is_the_smallest_normal_number(dtype):
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([0.0, -1.0, tiny / 4, tiny, 1.0], dtype=torch.float64).to(dtype)
    expected = rounded_once(torch.log(x.double().clamp(min=tiny)), dtype)
    assert torch.equal(safe_log(x), expected)
    assert safe_log(torch.zeros((), dtype=dtype)).item() == pytest.approx(math.log(tiny), rel=1e-2)


@pytest.mark.parametrize("dtype", FLOATS)
def test_safe_log_above_the_floor_is_log(dtype):
    x = torch.tensor([1e-3, 0.5, 1.0, 3.0, 1e4], dtype=torch.float64).to(dtype)
    assert torch.equal(safe_log(x), rounded_once(torch.log(x.double()), dtype))


def test_safe_log_gradient_is_reciprocal_above_the_floor_and_zero_below():
    x = torch.tensor([1e-9, 1e-6, 0.5, 4.0, -2.0, 0.0, math.inf], dtype=torch.float64)
    x.requires_grad_()
    safe_log(x, floor=1e-6).sum().backward()
    expected = torch.tensor([0.0, 1e6, 2.0, 0.25, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_safe_log_is_finite_with_finite_gradients_on_finite_input(dtype):
    x = extreme_values(dtype).requires_grad_()
    y = safe_log(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_safe_log_propagates_nan_and_inf():
    x = torch.tensor([math.nan, math.inf], requires_grad=True)
    y = safe_log(x)
    y.sum().backward()
    assert math.isnan(y[0].item()) and y[1].item() == math.inf
    assert math.isnan(x.grad[0].item()) and x.grad[1].item() == 0.0


def test_safe_log_passes_gradcheck():
    x = (torch.rand(20, dtype=torch.float64) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: safe_log(t, floor=0.01), (x,))


@pytest.mark.parametrize(
    ("floor", "error"),
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (1e-40, ValueError),  # a float32 subnormal: 1/floor overflows
        (True, TypeError),
        ("0.1", TypeError),
        (torch.tensor(0.1), TypeError),
    ],
)
def test_safe_log_rejects_a_bad_floor_by_name(floor, error):
    with pytest.raises(error, match="floor"):
        safe_log(torch.ones(3), floor=floor)


def test_safe_log_floor_must_be_normal_in_the_input_dtype():
    safe_log(torch.ones(3), floor=1e-6)
    with pytest.raises(ValueError, match="floor"):
        safe_log(torch.ones(3, dtype=torch.float16), floor=1e-6)  # below float16's 6.1e-5


def test_safe_log_rejects_integer_input():
    with pytest.raises(TypeError, match="x"):
        safe_log(torch.ones(3, dtype=torch.int32))


# --------------------------------------------------------------------------------------
# safe_div
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_safe_div_is_division_where_the_denominator_is_large_enough(dtype):
    a = torch.tensor([1.0, -3.0, 0.0, 7.0, 1e-3], dtype=dtype)
    b = torch.tensor([3.0, 0.25, -2.0, -1e-2, math.inf], dtype=dtype)
    assert torch.equal(safe_div(a, b), rounded_once(a.double() / b.double(), dtype))


@pytest.mark.parametrize(
    ("dtype", "eps"),
    [
        (torch.float32, 2.0**-63),
        (torch.bfloat16, 2.0**-63),
        (torch.float16, 2.0**-7),
        (torch.float64, 2.0**-511),
    ],
)
def test_safe_div_default_eps_is_the_square_root_of_the_smallest_normal(dtype, eps):
    assert eps == math.sqrt(torch.finfo(dtype).tiny)
    a = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0], dtype=dtype)
    b = torch.tensor([0.0, -0.0, eps / 2, -eps / 2, 0.0], dtype=torch.float64).to(dtype)
    expected = torch.tensor(
        [0.5 / eps, -0.5 / eps, 0.5 / eps, -0.5 / eps, 0.0], dtype=torch.float64
    )
    expected = expected.to(dtype)
    assert torch.equal(safe_div(a, b), expected)


def test_safe_div_uses_the_given_eps_with_the_sign_bit_of_b():
    a = torch.ones(4, dtype=torch.float64)
    b = torch.tensor([0.0, -0.0, 1e-4, 1e-2], dtype=torch.float64)
    expected = torch.tensor([1e3, -1e3, 1e3, 1e2], dtype=torch.float64)
    torch.testing.assert_close(safe_div(a, b, eps=1e-3), expected, rtol=0, atol=0)


def test_safe_div_gradients_are_the_quotient_rule_and_zero_where_clamped():
    a = torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([4.0, 0.0, -1e-6], dtype=torch.float64, requires_grad=True)
    safe_div(a, b, eps=1e-3).sum().backward()
    torch.testing.assert_close(a.grad, torch.tensor([0.25, 1e3, -1e3], dtype=torch.float64))
    torch.testing.assert_close(b.grad, torch.tensor([-2.0 / 16, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", FLOATS)
def test_safe_div_by_zero_has_finite_value_and_gradients(dtype):
    a = torch.tensor([1.0, -1.0, 0.0, 0.5], dtype=dtype, requires_grad=True)
    b = torch.tensor([0.0, -0.0, 0.0, 1.0], dtype=dtype)
    b = b + torch.tensor([0, 0, 0, 1], dtype=dtype) * math.sqrt(torch.finfo(dtype).tiny)
    b.requires_grad_()
    y = safe_div(a, b)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize(
    ("dtype_a", "dtype_b", "expected"),
    [
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32, torch.float32),
    ],
)
def test_safe_div_promotes_dtypes_like_torch(dtype_a, dtype_b, expected):
    a = torch.ones(3, dtype=dtype_a, requires_grad=True)
    b = torch.full((3,), 2.0, dtype=dtype_b, requires_grad=True)
    y = safe_div(a, b)
    assert y.dtype == expected == (a / b).dtype
    y.sum().backward()
    assert a.grad.dtype == dtype_a and b.grad.dtype == dtype_b


@pytest.mark.parametrize(("shape_a", "shape_b"), [((), (3,)), ((3,), ()), ((), ())])
def test_safe_div_promotes_zero_dim_tensors_like_torch(shape_a, shape_b):
    a = torch.ones(shape_a, dtype=torch.float64)
    b = torch.full(shape_b, 2.0, dtype=torch.float16)
    assert safe_div(a, b).dtype == (a / b).dtype == torch.result_type(a, b)


def test_safe_div_broadcasts_and_reduces_gradients_to_each_shape():
    a = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    b = (torch.rand(1, 4, dtype=torch.float64) + 0.5).requires_grad_()
    y = safe_div(a, b)
    assert y.shape == (3, 4)
    y.sum().backward()
    torch.testing.assert_close(a.grad, (1 / b.detach()).sum(1, keepdim=True).expand(3, 1))
    torch.testing.assert_close(b.grad, (-a.detach() / b.detach() ** 2).sum(0, keepdim=True))


def test_safe_div_passes_gradcheck():
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = (torch.rand(3, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(safe_div, (a, b))


def test_safe_div_propagates_nan():
    y = safe_div(torch.tensor([math.nan, 1.0]), torch.tensor([1.0, math.nan]))
    assert torch.isnan(y).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"a": torch.ones(3, dtype=torch.int64), "b": torch.ones(3)}, TypeError, "a"),
        ({"a": torch.ones(3), "b": torch.ones(3, dtype=torch.bool)}, TypeError, "b"),
        ({"a": torch.ones(3), "b": 2.0}, TypeError, "b"),
        ({"a": torch.ones(3), "b": torch.ones(4)}, ValueError, "broadcast"),
        ({"a": torch.ones(3), "b": torch.ones(3), "eps": 0.0}, ValueError, "eps"),
        ({"a": torch.ones(3), "b": torch.ones(3), "eps": -1e-3}, ValueError, "eps"),
        ({"a": torch.ones(3), "b": torch.ones(3), "eps": math.nan}, ValueError, "eps"),
        ({"a": torch.ones(3), "b": torch.ones(3), "eps": "1e-3"}, TypeError, "eps"),
    ],
)
def test_safe_div_rejects_bad_arguments_by_name(kwargs, error, name):
    with pytest.raises(error, match=name):
        safe_div(**kwargs)


# --------------------------------------------------------------------------------------
# All three: random extreme inputs, autocast, CUDA
# --------------------------------------------------------------------------------------

finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=80)
@given(
    values=st.lists(finite_floats, min_size=1, max_size=20),
    dtype=st.sampled_from(FLOATS),
)
def test_safe_ops_give_finite_values_and_gradients_on_finite_input(values, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    x = torch.where(x.isfinite(), x, 0).requires_grad_()  # float32 values may overflow
    numerator = torch.rand(x.shape, dtype=torch.float64).to(dtype).requires_grad_()
    outputs = [safe_sqrt(x), safe_log(x), safe_div(numerator, x)]
    torch.autograd.backward([out.sum() for out in outputs])
    assert all(torch.isfinite(out).all() for out in outputs)
    assert torch.isfinite(x.grad).all() and torch.isfinite(numerator.grad).all()


def test_safe_ops_work_under_cpu_autocast():
    layer = torch.nn.Linear(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = layer(torch.randn(3, 4))
        out = safe_sqrt(h) + safe_log(h) + safe_div(h, h - 1)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.cuda
def test_safe_ops_on_cuda_match_cpu():
    x = torch.tensor([-1.0, 0.0, 1e-30, 2.0])
    for fn in (safe_sqrt, safe_log, lambda t: safe_div(torch.ones_like(t), t)):
        torch.testing.assert_close(fn(x.cuda()).cpu(), fn(x))
