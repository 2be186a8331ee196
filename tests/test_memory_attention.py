"""finite.memory.attention against PyTorch's math-backend scaled_dot_product_attention.

The reference runs in float64 (``SDPBackend.MATH``), on the same inputs widened exactly;
soft-capping, which SDPA lacks, is checked against a float64 statement of its formula.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from finite.memory import activation_memory, attention

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(batch=(2, 3), length=37, keys=None, dim=8, value_dim=None, dtype=torch.float64,
           seed=0, scale=1.0):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    keys = length if keys is None else keys
    value_dim = dim if value_dim is None else value_dim
    q = torch.randn(*batch, length, dim, generator=g, dtype=torch.float64) * scale
    k = torch.randn(*batch, keys, dim, generator=g, dtype=torch.float64) * scale
    v = torch.randn(*batch, keys, value_dim, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa64(q, k, v, *, causal=False, mask=None, scale=None):
    """Math-backend SDPA in float64; ``causal`` and ``mask`` combined into one mask."""
    q, k, v = (t.double() for t in (q, k, v))
    if causal:
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        if mask is None:
            mask = tril
        elif mask.dtype == torch.bool:
            mask = mask & tril
        else:
            mask = mask.double().masked_fill(~tril, -math.inf)
    elif mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def softcapped64(q, k, v, cap, scale, causal=False):
    """softmax(cap * tanh(q k^T scale / cap) [causal]) v in float64."""
    s = (q.double() @ k.double().mT) * scale
    s = cap * torch.tanh(s / cap)
    if causal:
        s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(s, dim=-1) @ v.double()


def outputs_and_grads(fn, q, k, v):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(upstream)
    return out.detach(), [t.grad for t in leaves]


def assert_matches(ours, reference, rtol):
    out, grads = ours
    ref_out, ref_grads = reference
    for got, want in zip([out, *grads], [ref_out, *ref_grads], strict=True):
        assert not got.isnan().any()
        # Relative to the largest entry, and at least to 1 (inputs are of order 1): a
        # gradient that is 0 in exact arithmetic comes out as rounding noise.
        scale = want.double().abs().max().clamp_min(1.0)
        error = (got.double() - want.double()).abs().max()
        assert error <= rtol * scale, f"relative error {float(error / scale):.3g} > {rtol}"


# --------------------------------------------------------------------------------------
# against SDPA
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_matches_sdpa(dtype, causal, chunk):
    q, k, v = inputs(dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    ours = outputs_and_grads(lambda *t: attention(*t, causal=causal, chunk_size=chunk), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, causal=causal), q, k, v)
    assert ours[0].dtype == dtype
    assert_matches(ours, ref, rtol)


@pytest.mark.parametrize("causal", [False, True])
def test_bool_mask_matches_sdpa(causal):
    q, k, v = inputs(length=29, keys=41)
    mask = torch.rand(29, 41, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True  # every row keeps a key (fully masked rows have their own test)
    ours = outputs_and_grads(
        lambda *t: attention(*t, causal=causal, mask=mask, chunk_size=8), q, k, v
    )
    ref = outputs_and_grads(lambda *t: sdpa64(*t, causal=causal, mask=mask), q, k, v)
    assert_matches(ours, ref, 1e-12)


def test_float_mask_matches_sdpa():
    q, k, v = inputs()
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(2, 1, 37, 37, generator=g, dtype=torch.float64)  # broadcast heads
    bias[..., 3:9] = -math.inf
    ours = outputs_and_grads(lambda *t: attention(*t, mask=bias, chunk_size=10), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, mask=bias), q, k, v)
    assert_matches(ours, ref, 1e-12)


def test_more_queries_than_keys_causal():
    # PyTorch's is_causal is the top-left triangle: query i sees keys 0..i.
    q, k, v = inputs(length=50, keys=20, value_dim=5)
    ours = outputs_and_grads(lambda *t: attention(*t, causal=True, chunk_size=7), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, causal=True), q, k, v)
    assert_matches(ours, ref, 1e-12)


def test_explicit_scale():
    q, k, v = inputs()
    ours = outputs_and_grads(lambda *t: attention(*t, scale=0.05, chunk_size=9), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, scale=0.05), q, k, v)
    assert_matches(ours, ref, 1e-12)


@pytest.mark.parametrize("shape", [(), (4,)])
def test_fewer_batch_dimensions(shape):
    q, k, v = inputs(batch=shape, length=20)
    ours = outputs_and_grads(lambda *t: attention(*t, chunk_size=6), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t), q, k, v)
    assert_matches(ours, ref, 1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_matches_formula(causal):
    q, k, v = inputs(scale=3.0)
    scale = 1 / math.sqrt(8)
    ours = outputs_and_grads(
        lambda *t: attention(*t, softcap=5.0, causal=causal, chunk_size=11), q, k, v
    )
    ref = outputs_and_grads(lambda *t: softcapped64(*t, 5.0, scale, causal), q, k, v)
    assert_matches(ours, ref, 1e-12)


# --------------------------------------------------------------------------------------
# numerics at the edges
# --------------------------------------------------------------------------------------


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = inputs(length=12, keys=12)
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[[2, 7]] = False
    out, (dq, dk, dv) = outputs_and_grads(
        lambda *t: attention(*t, mask=mask, chunk_size=4), q, k, v
    )
    assert not out.isnan().any()
    assert torch.count_nonzero(out[..., [2, 7], :]) == 0
    assert torch.count_nonzero(dq[..., [2, 7], :]) == 0
    assert not dk.isnan().any() and not dv.isnan().any()
    # The other rows are untouched by the empty ones.
    ref = sdpa64(q[..., :2, :], k, v, mask=mask[:2])
    torch.testing.assert_close(out[..., :2, :], ref, rtol=1e-12, atol=1e-12)


def test_float_mask_of_all_minus_infinity_row_is_zero():
    q, k, v = inputs(length=6, keys=9)
    bias = torch.zeros(6, 9, dtype=torch.float64)
    bias[4] = -math.inf
    out, grads = outputs_and_grads(lambda *t: attention(*t, mask=bias, chunk_size=4), q, k, v)
    assert torch.count_nonzero(out[..., 4, :]) == 0
    assert all(not g.isnan().any() for g in grads)


def test_no_keys_gives_zero_output_and_gradients():
    q, k, v = inputs(length=5, keys=0)
    out, grads = outputs_and_grads(lambda *t: attention(*t, chunk_size=4), q, k, v)
    assert out.shape == (2, 3, 5, 8)
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(grads[0]) == 0


def test_float16_scores_beyond_float16_range_do_not_overflow():
    # Keys equal to the queries: q.q reaches ~1e5 > 65504 (float16's maximum), so a
    # float16 product overflows; the scaled scores (/ 8) are within range, and scores
    # are formed in float32.
    q, _, v = inputs(dim=64, length=24, scale=40.0, dtype=torch.float16)
    k = q.clone()
    assert (q.double() @ k.double().mT).abs().max() > 65504
    ours = outputs_and_grads(lambda *t: attention(*t, chunk_size=8), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t), q, k, v)
    assert ours[0].dtype == torch.float16
    assert torch.isfinite(ours[0]).all()
    assert all(torch.isfinite(g).all() for g in ours[1])
    # Only the output's rounding: softmax at these magnitudes is nearly one-hot.
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_its_tolerance(dtype):
    q, k, v = inputs(dtype=dtype)
    ours = outputs_and_grads(lambda *t: attention(*t, causal=True, chunk_size=16), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, causal=True), q, k, v)
    # float32 inside, one rounding of each result: a few ulps of the dtype.
    assert_matches(ours, ref, 4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("case", ["plain", "causal", "softcap", "bool mask", "float mask"])
def test_bfloat16_products_within_its_tolerance(case):
    # On CPU, bfloat16 multiplies probabilities and dS in bfloat16 products: every option
    # of that path, over uneven tiles, against float64.
    q, k, v = inputs(length=70, keys=53, dim=16, dtype=torch.bfloat16, scale=2.0)
    g = torch.Generator().manual_seed(3)
    kwargs, reference = {}, sdpa64
    if case == "causal":
        kwargs = dict(causal=True)
    elif case == "softcap":
        kwargs = dict(softcap=4.0)
        reference = lambda *t, **_: softcapped64(*t, 4.0, 1 / math.sqrt(16))  # noqa: E731
    elif case == "bool mask":
        kwargs = dict(mask=torch.rand(70, 53, generator=g) > 0.3)
        kwargs["mask"][:, 0] = True
    elif case == "float mask":
        kwargs = dict(mask=torch.randn(70, 53, generator=g, dtype=torch.float64).bfloat16())
    ours = outputs_and_grads(lambda *t: attention(*t, chunk_size=24, **kwargs), q, k, v)
    ref = outputs_and_grads(lambda *t: reference(*t, **kwargs), q, k, v)
    assert all(t.dtype == torch.bfloat16 for t in (ours[0], *ours[1]))
    assert_matches(ours, ref, 4 * torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_error_is_a_few_roundings(causal):
    # Scores and dO v^T are float32 products, so the error is the results' own rounding
    # (about 2**-9.3 root-mean-square relative) plus that of the bfloat16 products and of
    # the rounded output in D = rowsum(dO * O), about 2**-8 in all (PyTorch's fused
    # bfloat16 kernel: about 2**-8.5). Bound: 2**-7, the bfloat16 epsilon.
    q, k, v = inputs(batch=(2,), length=256, dim=64, dtype=torch.bfloat16, scale=1.5)
    ours = outputs_and_grads(lambda *t: attention(*t, causal=causal, chunk_size=64), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, causal=causal), q, k, v)
    for got, want in zip([ours[0], *ours[1]], [ref[0], *ref[1]], strict=True):
        error = (got.double() - want).square().mean().sqrt()
        assert error <= 2**-7 * want.square().mean().sqrt()


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


def test_saves_inputs_output_and_row_statistics_only():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, chunk_size=16)

    heads, length, dim = 4, 96, 8
    q, k, v = (
        t.requires_grad_() for t in inputs(batch=(heads,), length=length, dtype=torch.float32)
    )
    report = activation_memory(Attend(), q, k, v)
    # q, k, v and the output (4 x 96 x 8 float32 each) plus the logsumexp (4 x 96).
    assert report.total_bytes == 4 * heads * length * dim * 4 + heads * length * 4


# --------------------------------------------------------------------------------------
# random shapes
# --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 30),
    keys=st.integers(1, 30),
    dim=st.integers(1, 6),
    chunk=st.integers(1, 32),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_sdpa(length, keys, dim, chunk, causal, seed):
    q, k, v = inputs(batch=(2,), length=length, keys=keys, dim=dim, seed=seed)
    ours = outputs_and_grads(lambda *t: attention(*t, causal=causal, chunk_size=chunk), q, k, v)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, causal=causal), q, k, v)
    assert_matches(ours, ref, 1e-11)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

Q = K = V = torch.randn(2, 5, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(q=Q.long()), TypeError, "q must be a real floating-point tensor"),
        (dict(k=K.double()), ValueError, "k has dtype torch.float64 but q has torch.float32"),
        (dict(v=torch.randn(3, 5, 4)), ValueError, r"v must have the batch dimensions of q"),
        (dict(k=torch.randn(2, 5, 3)), ValueError, "k must have q's feature size 4"),
        (dict(v=torch.randn(2, 6, 4)), ValueError, r"v must have as many rows as k \(5\)"),
        (dict(q=torch.randn(4)), ValueError, r"q must have shape \(\.\.\., L, E\)"),
        (dict(causal=1), TypeError, "causal must be a bool, got int"),
        (dict(scale="a"), TypeError, "scale must be a float, got str"),
        (dict(scale=math.inf), ValueError, "scale must be finite"),
        (dict(softcap=-1.0), ValueError, "softcap must be a positive finite float"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
        (dict(mask=torch.ones(5, 5, dtype=torch.long)), TypeError, "mask must be bool or float"),
        (dict(mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "does not broadcast"),
        (dict(mask=torch.zeros(5, 5, requires_grad=True)), ValueError, "mask requires grad"),
    ],
)
def test_bad_input_raises(kwargs, error, message):
    args = dict(q=Q, k=K, v=V)
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=message):
        attention(q, k, v, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_float64(dtype):
    q, k, v = inputs(length=300, dim=64)
    ref = outputs_and_grads(lambda *t: sdpa64(*t, causal=True), q, k, v)
    cuda = [t.cuda().to(dtype) for t in (q, k, v)]
    out, grads = outputs_and_grads(lambda *t: attention(*t, causal=True, chunk_size=128), *cuda)
    rtol = 2e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert_matches((out.cpu(), [g.cpu() for g in grads]), ref, rtol)
