"""total_norm, clip_grad_norm_ and clip_grad_value_ against PyTorch's own functions and
float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from finite.clipping import clip_grad_norm_, clip_grad_value_, total_norm

INF = math.inf
NAN = math.nan
FLOAT16_MAX = torch.finfo(torch.float16).max


def params_with_grads(grads):
    """Parameters (zeros) carrying copies of ``grads`` (None leaves ``.grad`` unset)."""
    params = []
    for grad in grads:
        if grad is None:
            params.append(torch.nn.Parameter(torch.zeros(2)))
            continue
        param = torch.nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        params.append(param)
    return params


def random_grads(dtype=torch.float32, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 5), (7,), (2, 3, 2), (1,)]
    return [(torch.randn(s, generator=generator) * scale).to(dtype) for s in shapes]


def float64_norm(tensors, norm_type):
    """The reference: the p-norm of every element, concatenated, in float64."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    return torch.linalg.vector_norm(flat, norm_type).item()


# ----------------------------------------------------------------------------- total_norm
finite_arrays = hnp.arrays(
    dtype=st.sampled_from(["float32", "float64"]),
    shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6),
    elements=st.floats(-1e6, 1e6, allow_nan=False, width=32),
)


@given(
    arrays=st.lists(finite_arrays, min_size=1, max_size=5),
    norm_type=st.sampled_from([1.0, 2.0, 3.0, 0.5, INF]),
)
def test_total_norm_matches_float64_reference(arrays, norm_type):
    tensors = [torch.from_numpy(a.copy()) for a in arrays]
    expected = float64_norm(tensors, norm_type)
    assert total_norm(tensors, norm_type).item() == pytest.approx(expected, rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -INF, 0.5, 3.0])
def test_total_norm_of_unusual_orders_matches_torch(norm_type):
    tensors = [torch.tensor([0.0, 2.0, -3.0]), torch.tensor([1.0, 0.0])]
    expected = torch.nn.utils.get_total_norm(tensors, norm_type)
    assert torch.equal(total_norm(tensors, norm_type), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_total_norm_of_half_precision_accumulates_in_float32(dtype):
    # 40000 is near float16's limit 65504: squares (1.6e9) and the norm itself overflow it.
    tensors = [torch.full((100,), 40000.0, dtype=dtype), torch.full((3,), -250.0, dtype=dtype)]
    result = total_norm(tensors)
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(float64_norm(tensors, 2.0), rel=1e-6)


def test_total_norm_of_half_precision_infinity_norm_keeps_the_largest_value_exactly():
    tensors = [torch.tensor([FLOAT16_MAX, -1.0], dtype=torch.float16)]
    assert total_norm(tensors, INF).item() == FLOAT16_MAX


def test_total_norm_of_many_small_bfloat16_values_is_not_lost_to_rounding():
    # In bfloat16 (8-bit mantissa) a running sum of 1e5 ones stalls at 256.
    tensors = [torch.ones(100_000, dtype=torch.bfloat16)]
    assert total_norm(tensors, 1.0).item() == 100_000.0


def test_total_norm_of_float64_and_float32_is_float64():
    # 1e150 is beyond float32's range; its square is still finite in float64.
    tensors = [torch.tensor([1e150, 1e150], dtype=torch.float64), torch.ones(3)]
    result = total_norm(tensors)
    assert result.dtype == torch.float64
    assert result.item() == pytest.approx(math.sqrt(2) * 1e150, rel=1e-15)


def test_total_norm_of_a_single_tensor():
    assert total_norm(torch.tensor([3.0, 4.0])).item() == 5.0


def test_total_norm_of_nothing_is_a_float32_zero():
    result = total_norm([])
    assert result.dtype == torch.float32 and result.item() == 0.0


def test_total_norm_skips_empty_tensors_even_for_the_infinity_norm():
    tensors = [torch.empty(0), torch.tensor([-2.0, 1.0])]
    assert total_norm(tensors, INF).item() == 2.0


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_total_norm_propagates_nan(norm_type):
    tensors = [torch.tensor([1.0, INF]), torch.tensor([NAN])]
    assert math.isnan(total_norm(tensors, norm_type).item())


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_total_norm_of_an_inf_is_inf(norm_type):
    assert total_norm([torch.tensor([1.0, -INF])], norm_type).item() == INF


@pytest.mark.parametrize(
    ("tensors", "error"),
    [
        ("abc", TypeError),
        (3.0, TypeError),
        ([torch.ones(2), 1.0], TypeError),
        ([torch.ones(2, dtype=torch.int64)], TypeError),
        ([torch.ones(2).to_sparse()], TypeError),
    ],
)
def test_total_norm_rejects_what_is_not_a_dense_float_tensor(tensors, error):
    with pytest.raises(error, match="tensors"):
        total_norm(tensors)


@pytest.mark.parametrize(("norm_type", "error"), [(NAN, ValueError), ("2", TypeError)])
def test_total_norm_rejects_bad_norm_type(norm_type, error):
    with pytest.raises(error, match="norm_type"):
        total_norm([torch.ones(2)], norm_type)


def test_total_norm_rejects_a_process_group_that_is_not_one():
    with pytest.raises(TypeError, match="process_group"):
        total_norm([torch.ones(2)], process_group="default")


# ----------------------------------------------------------------------------- clip_grad_norm_
@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch_bitwise(norm_type, dtype, max_norm):
    ours = params_with_grads(random_grads(dtype))
    theirs = params_with_grads(random_grads(dtype))
    norm = clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert torch.equal(norm, expected) and norm.dtype == expected.dtype
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("foreach", [True, False])
def test_clip_grad_norm_foreach_and_loop_agree_with_torch(foreach):
    ours = params_with_grads(random_grads())
    theirs = params_with_grads(random_grads())
    norm = clip_grad_norm_(ours, 1.0, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=foreach)
    assert torch.equal(norm, expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_grad_norm_of_half_grads_matches_torch_where_torch_does_not_overflow(norm_type, dtype):
    ours = params_with_grads(random_grads(dtype))
    theirs = params_with_grads(random_grads(dtype))
    norm = clip_grad_norm_(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert norm.dtype == torch.float32
    # torch rounds the norm (and so the coefficient) to the half dtype; we keep float32.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(norm, expected.float(), rtol=eps, atol=0)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=2 * eps, atol=0)


def test_clip_grad_norm_of_float16_grads_near_the_float16_limit_matches_float64():
    grads = [torch.full((64,), 60000.0, dtype=torch.float16), torch.full((8,), -65504.0).half()]
    params = params_with_grads(grads)
    norm = clip_grad_norm_(params, 1.0)
    reference = float64_norm(grads, 2.0)
    assert norm.item() == pytest.approx(reference, rel=1e-6)
    clipped = [p.grad.double() for p in params]
    # Each gradient is multiplied by 1 / reference, then rounded to float16.
    for grad, original in zip(clipped, grads, strict=True):
        torch.testing.assert_close(grad, original.double() / reference, rtol=1e-3, atol=0)


def test_clip_grad_norm_returns_the_norm_before_clipping_and_clips_to_max_norm():
    params = params_with_grads([torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]])])
    norm = clip_grad_norm_(params, 2.0)
    assert norm.item() == 5.0
    # Coefficient 2 / (5 + 1e-6), as torch.
    coefficient = 2.0 / (5.0 + 1e-6)
    assert params[0].grad.tolist() == pytest.approx([3.0 * coefficient, 0.0], rel=1e-7)
    assert params[1].grad.flatten().tolist() == pytest.approx([0.0, 4.0 * coefficient], rel=1e-7)


@given(
    arrays=st.lists(
        hnp.arrays(
            dtype="float64",
            shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
            elements=st.floats(-1e3, 1e3),
        ),
        min_size=1,
        max_size=4,
    ),
    # Above 1e-30 the squares of the clipped values stay normal in the float64 reference.
    max_norm=st.one_of(st.just(0.0), st.floats(1e-30, 100.0)),
)
def test_clipped_norm_never_exceeds_max_norm(arrays, max_norm):
    params = params_with_grads([torch.from_numpy(a.copy()) for a in arrays])
    clip_grad_norm_(params, max_norm)
    assert float64_norm([p.grad for p in params], 2.0) <= max_norm * (1 + 1e-12)


def test_clip_grad_norm_leaves_parameters_without_grad_alone():
    grads = random_grads()
    params = params_with_grads([grads[0], None, grads[1]])
    norm = clip_grad_norm_(params, 1.0)
    assert params[1].grad is None
    assert norm.item() == pytest.approx(float64_norm(grads[:2], 2.0), rel=1e-6)


def test_clip_grad_norm_accepts_a_single_tensor_and_a_generator():
    single = params_with_grads([torch.tensor([3.0, 4.0])])[0]
    assert clip_grad_norm_(single, 1.0).item() == 5.0
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[6.0, 8.0]])
    assert clip_grad_norm_(model.parameters(), 1.0).item() == 10.0


def test_clip_grad_norm_of_nothing_returns_a_zero():
    assert clip_grad_norm_([], 1.0).item() == 0.0
    assert clip_grad_norm_(params_with_grads([None]), 1.0).item() == 0.0


def test_clip_grad_norm_rejects_sparse_gradients_clearly():
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        clip_grad_norm_(embedding.parameters(), 1.0)


@pytest.mark.parametrize("bad", [[1.0, INF], [NAN, 1.0]])
def test_clip_grad_norm_error_if_nonfinite_raises(bad):
    params = params_with_grads([torch.tensor(bad)])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(params_with_grads([torch.tensor(bad)]), 1.0, 2.0, True)


@pytest.mark.parametrize("bad", [[1.0, INF], [NAN, 1.0]])
def test_clip_grad_norm_with_a_nonfinite_norm_scales_like_torch(bad):
    ours = params_with_grads([torch.tensor(bad), torch.tensor([2.0])])
    theirs = params_with_grads([torch.tensor(bad), torch.tensor([2.0])])
    norm = clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(norm, expected, equal_nan=True)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_clip_grad_norm_error_if_nonfinite_passes_finite_norms():
    params = params_with_grads([torch.tensor([3.0, 4.0])])
    assert clip_grad_norm_(params, 10.0, error_if_nonfinite=True).item() == 5.0


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_norm": -1.0}, ValueError, "max_norm"),
        ({"max_norm": NAN}, ValueError, "max_norm"),
        ({"max_norm": "1"}, TypeError, "max_norm"),
        ({"max_norm": True}, TypeError, "max_norm"),
        ({"max_norm": 1.0, "norm_type": NAN}, ValueError, "norm_type"),
        ({"max_norm": 1.0, "foreach": "yes"}, TypeError, "foreach"),
        ({"max_norm": 1.0, "process_group": 0}, TypeError, "process_group"),
    ],
)
def test_clip_grad_norm_rejects_bad_arguments(kwargs, error, name):
    params = params_with_grads([torch.ones(3)])
    with pytest.raises(error, match=name):
        clip_grad_norm_(params, **kwargs)
    assert torch.equal(params[0].grad, torch.ones(3))


def test_clip_grad_norm_with_infinite_max_norm_leaves_grads_unchanged():
    grads = random_grads()
    params = params_with_grads(grads)
    clip_grad_norm_(params, INF)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))


def test_clip_grad_norm_with_zero_max_norm_zeroes_the_grads():
    params = params_with_grads(random_grads())
    clip_grad_norm_(params, 0.0)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_clip_grad_norm_on_cuda_matches_torch_and_does_not_sync(dtype):
    grads = [g.cuda() for g in random_grads(dtype)]
    ours = params_with_grads(grads)
    theirs = params_with_grads(grads)
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = clip_grad_norm_(ours, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm.device == grads[0].device
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(norm, expected.float(), rtol=eps, atol=0)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=2 * eps, atol=0)


# ----------------------------------------------------------------------------- clip_grad_value_
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_matches_torch(dtype, foreach):
    ours = params_with_grads([*random_grads(dtype), None])
    theirs = params_with_grads([*random_grads(dtype), None])
    clip_grad_value_(ours, 1.5, foreach=foreach)
    torch.nn.utils.clip_grad_value_(theirs, 1.5, foreach=foreach)
    for p, q in zip(ours, theirs, strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_clip_grad_value_clamps_to_the_interval_and_keeps_nan():
    params = params_with_grads([torch.tensor([-INF, -3.0, 0.25, 3.0, NAN])])
    clip_grad_value_(params, 1.0)
    torch.testing.assert_close(
        params[0].grad, torch.tensor([-1.0, -1.0, 0.25, 1.0, NAN]), equal_nan=True
    )


@pytest.mark.parametrize(
    ("value", "error"), [(-1.0, ValueError), (NAN, ValueError), ("1", TypeError)]
)
def test_clip_grad_value_rejects_bad_clip_value(value, error):
    with pytest.raises(error, match="clip_value"):
        clip_grad_value_(params_with_grads([torch.ones(2)]), value)


def test_clip_grad_value_rejects_sparse_gradients_clearly():
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        clip_grad_value_(embedding.parameters(), 1.0)
