"""finite.memory.linear_cross_entropy against the materialised logits path.

The reference is ``finite.ops.cross_entropy(hidden @ weight.T + bias, target, ...)``,
differentiated by autograd through the full logits; float64 also against PyTorch's
``F.cross_entropy`` where the options overlap.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from finite import ops
from finite.memory import activation_memory, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


OPTIONS = list(
    itertools.product(
        [0.0, 0.1],  # label_smoothing
        [0.0, 1e-3],  # z_loss
        [None, 4.0],  # softcap
        ["mean", "sum", "none"],
        [False, True],  # bias
    )
)


def problem(rows=37, features=16, vocab=50, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(vocab, features, generator=g, dtype=torch.float64) / 2
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[::4] = -100
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), target


def loss_and_grads(fn, hidden, weight, bias, target, reduction, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    loss = fn(h, w, target, b, reduction=reduction, **options)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(upstream)
    return loss.detach(), [t.grad for t in leaves]


def ours(h, w, target, b, **options):
    return linear_cross_entropy(h, w, target, bias=b, **options)


def materialised(h, w, target, b, **options):
    return ops.cross_entropy(h @ w.T + b, target, **options)


def ours_no_bias(h, w, target, b, **options):
    return linear_cross_entropy(h, w, target, **options) + 0 * b.sum()


def materialised_no_bias(h, w, target, b, **options):
    return ops.cross_entropy(h @ w.T, target, **options) + 0 * b.sum()


def assert_relative(actual, expected, rtol):
    scale = expected.double().abs().max().clamp_min(1e-30)
    error = (actual.double() - expected.double()).abs().max()
    assert error <= rtol * scale, f"relative error {float(error / scale):.3g} > {rtol}"


def compare(dtype, rtol, smoothing, z, cap, reduction, with_bias, chunk_size=8,
            vocab_chunk_size=None, **kw):  # fmt: skip
    hidden, weight, bias, target = problem(dtype=dtype, **kw)
    options = dict(label_smoothing=smoothing, z_loss=z, softcap=cap)
    fn, ref = (ours, materialised) if with_bias else (ours_no_bias, materialised_no_bias)
    blocks = dict(chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
    loss, grads = loss_and_grads(fn, hidden, weight, bias, target, reduction, **blocks, **options)
    ref_loss, ref_grads = loss_and_grads(ref, hidden, weight, bias, target, reduction, **options)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert_relative(loss, ref_loss, rtol)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert_relative(got, want, rtol)


@pytest.mark.parametrize(("smoothing", "z", "cap", "reduction", "with_bias"), OPTIONS)
def test_float32_matches_materialised(smoothing, z, cap, reduction, with_bias):
    compare(torch.float32, 1e-5, smoothing, z, cap, reduction, with_bias)


@pytest.mark.parametrize(("smoothing", "z", "cap", "reduction", "with_bias"), OPTIONS)
def test_float64_matches_materialised(smoothing, z, cap, reduction, with_bias):
    compare(torch.float64, 1e-12, smoothing, z, cap, reduction, with_bias)


@pytest.mark.parametrize(("smoothing", "z", "cap", "reduction", "with_bias"), OPTIONS[::5])
def test_bfloat16_within_bfloat16_tolerance(smoothing, z, cap, reduction, with_bias):
    # Both sides round the logits to bfloat16; the gradients' products round differently
    # (ours sums float32 block products), so allow a few bfloat16 ulps (2**-8 each).
    compare(torch.bfloat16, 2e-2, smoothing, z, cap, reduction, with_bias)


# Vocabulary tiles: 7 classes per tile over a vocabulary of 50 (seven tiles of 7, one
# of 1), 8 rows per block over 37 rows, with an online log-sum-exp across the tiles.


@pytest.mark.parametrize(("smoothing", "z", "cap", "reduction", "with_bias"), OPTIONS)
def test_vocabulary_tiles_float64_match_materialised(smoothing, z, cap, reduction, with_bias):
    compare(torch.float64, 1e-12, smoothing, z, cap, reduction, with_bias, vocab_chunk_size=7)


@pytest.mark.parametrize(("smoothing", "z", "cap", "reduction", "with_bias"), OPTIONS)
def test_vocabulary_tiles_float32_match_materialised(smoothing, z, cap, reduction, with_bias):
    compare(torch.float32, 1e-5, smoothing, z, cap, reduction, with_bias, vocab_chunk_size=7)


@pytest.mark.parametrize(("smoothing", "z", "cap", "reduction", "with_bias"), OPTIONS)
def test_vocabulary_tiles_bfloat16_within_tolerance(smoothing, z, cap, reduction, with_bias):
    # The hidden gradient sums one rounded bfloat16 product per tile in float32.
    compare(torch.bfloat16, 2e-2, smoothing, z, cap, reduction, with_bias, vocab_chunk_size=7)


@pytest.mark.parametrize("vocab_chunk_size", [1, 13, 49, 50, 1000])
def test_vocab_chunk_size_does_not_change_the_result(vocab_chunk_size):
    compare(torch.float64, 1e-12, 0.1, 1e-3, 4.0, "mean", True, chunk_size=5,
            vocab_chunk_size=vocab_chunk_size)  # fmt: skip


def test_vocabulary_tiles_with_large_logits_stay_finite():
    # Logits of about 1e4, the maximum growing from tile to tile: every rescaling
    # exp(m - m') must stay <= 1.
    compare(torch.float32, 1e-5, 0.1, 1e-4, None, "mean", True, vocab_chunk_size=6, scale=3e3)


def test_vocabulary_tiles_with_target_logit_far_below_the_rest():
    # Each target is its row's smallest logit: log p_t lies between -370 and -190, so
    # p_t underflows float32; the loss comes from x_t - m in float64 and the target's
    # gradient is p_t - 1 = -1.
    hidden, weight, _, target = problem(dtype=torch.float64, scale=30.0)
    target = torch.where(target == -100, -100, (hidden @ weight.T).argmin(dim=-1))
    h32 = hidden.float().requires_grad_()
    loss = linear_cross_entropy(h32, weight.float(), target, chunk_size=8, vocab_chunk_size=9)
    loss.backward()
    h64 = hidden.clone().requires_grad_()
    expected = ops.cross_entropy(h64 @ weight.T, target)
    expected.backward()
    assert_relative(loss, expected, 1e-5)
    assert_relative(h32.grad, h64.grad, 1e-5)


@pytest.mark.parametrize("vocab_chunk_size", [7, 1])
def test_all_ignored_gives_zero_loss_and_zero_gradients_on_tiles(vocab_chunk_size):
    hidden, weight, bias, _ = problem()
    target = torch.full((hidden.shape[0],), -100)
    loss, grads = loss_and_grads(
        ours, hidden, weight, bias, target, "mean", z_loss=1e-2, vocab_chunk_size=vocab_chunk_size
    )
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_empty_batch_on_tiles_gives_zero():
    hidden, weight, bias, target = problem(rows=0)
    loss, grads = loss_and_grads(ours, hidden, weight, bias, target, "mean", vocab_chunk_size=7)
    assert loss.item() == 0.0
    assert grads[0].shape == (0, 16)
    assert torch.count_nonzero(grads[1]) == 0


def test_second_backward_on_tiles_recomputes():
    hidden, weight, bias, target = problem(dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, target, bias=bias, chunk_size=8, vocab_chunk_size=7)
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 3, h)
    torch.testing.assert_close(second, 3 * first, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_pytorch_cross_entropy(reduction):
    hidden, weight, bias, target = problem(dtype=torch.float64)
    loss = linear_cross_entropy(
        hidden, weight, target, bias=bias, label_smoothing=0.2, reduction=reduction
    )
    expected = F.cross_entropy(
        F.linear(hidden, weight, bias), target, label_smoothing=0.2, reduction=reduction
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    compare(torch.float64, 1e-12, 0.1, 1e-3, 4.0, "mean", True, chunk_size=chunk_size)


def test_custom_ignore_index():
    hidden, weight, _, target = problem(dtype=torch.float64)
    target = torch.where(target == -100, 7, target)
    loss = linear_cross_entropy(hidden, weight, target, ignore_index=7, chunk_size=4)
    expected = F.cross_entropy(hidden @ weight.T, target, ignore_index=7)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, bias, _ = problem()
    target = torch.full((hidden.shape[0],), -100)
    loss, grads = loss_and_grads(ours, hidden, weight, bias, target, "mean", z_loss=1e-2)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_empty_batch_gives_zero():
    hidden, weight, bias, target = problem(rows=0)
    loss, grads = loss_and_grads(ours, hidden, weight, bias, target, "mean")
    assert loss.item() == 0.0
    assert grads[0].shape == (0, 16)
    assert torch.count_nonzero(grads[1]) == 0


def test_batch_dimensions_are_flattened_and_restored():
    hidden, weight, bias, target = problem(rows=24, dtype=torch.float64)
    h3, t3 = hidden.reshape(2, 3, 4, 16), target.reshape(2, 3, 4)
    loss = linear_cross_entropy(h3, weight, t3, bias=bias, reduction="none", chunk_size=5)
    expected = ops.cross_entropy(hidden @ weight.T + bias, target, reduction="none")
    assert loss.shape == (2, 3, 4)
    torch.testing.assert_close(loss.reshape(-1), expected, rtol=1e-12, atol=1e-12)


def test_large_logits_stay_finite():
    # Logits of about 1e4: exp would overflow float32 without the shift by the maximum.
    compare(torch.float32, 1e-5, 0.1, 1e-4, None, "mean", True, scale=3e3)


def test_second_backward_through_retained_graph_recomputes():
    hidden, weight, bias, target = problem(dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, target, bias=bias, chunk_size=8)
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 3, h)
    torch.testing.assert_close(second, 3 * first, rtol=1e-12, atol=0)


def test_frozen_hidden_gets_no_gradient():
    hidden, weight, _, target = problem()
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, target).backward()
    expected = torch.autograd.grad(ops.cross_entropy(hidden @ w.T, target), w)[0]
    assert_relative(w.grad, expected, 1e-5)
    assert hidden.grad is None


def test_no_grad_forward_gives_the_loss():
    hidden, weight, _, target = problem(dtype=torch.float64)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, z_loss=1e-3)
    expected = ops.cross_entropy(hidden @ weight.T, target, z_loss=1e-3)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_no_tokens_by_vocabulary_tensor_is_saved():
    rows, features, vocab = 64, 8, 512

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(vocab, features))

        def forward(self, h, t):
            return linear_cross_entropy(h, self.weight, t, chunk_size=16)

    h = torch.randn(rows, features, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    report = activation_memory(Head(), h, t)
    assert max(s.nbytes for s in report.storages) < rows * vocab * 4


def test_materialised_path_keeps_the_logits():
    # The counterpart of the test above, so that its bound can fail.
    rows, vocab = 64, 512
    head = nn.Linear(8, vocab, bias=False)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, h, t):
            return ops.cross_entropy(self.head(h), t)

    report = activation_memory(Head(), torch.randn(rows, 8), torch.randint(0, vocab, (rows,)))
    assert max(s.nbytes for s in report.storages) >= rows * vocab * 4


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns, leaving out given shapes."""

    def __init__(self, *skip_shapes):
        super().__init__()
        self.skip = {torch.Size(shape) for shape in skip_shapes}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.shape not in self.skip:
                self.largest = max(self.largest, t.numel())
        return out


def largest_tile(rows, features, vocab, dtype=torch.float32, **blocks):
    """Largest tensor of forward + backward, besides the inputs' and gradients' shapes."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, features, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, features, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=g).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=g)
    with LargestTensor((rows, features), (vocab, features)) as mode:
        loss = linear_cross_entropy(hidden, weight, target, bias=bias, softcap=5.0, **blocks)
        loss.backward()
    return mode.largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_tiles_bound_every_tensor_by_the_tile(dtype):
    # 64 x 100 logits per tile: no tensor of forward or backward is larger (the vocabulary
    # itself, bias and its gradient, has 2000 entries).
    assert largest_tile(256, 8, 2000, dtype, chunk_size=64, vocab_chunk_size=100) == 64 * 100


def test_full_vocabulary_blocks_hold_rows_by_vocabulary():
    # The counterpart of the test above, so that its bound can fail.
    assert largest_tile(256, 8, 2000, chunk_size=64) == 64 * 2000


def test_default_tiles_the_vocabulary_when_row_blocks_would_be_thin():
    # 2048 rows x 4 features against 8192 classes: a full-vocabulary block as large as
    # hidden would have one row; the default tiles 1024 rows x 2048 classes instead.
    rows, vocab = 2048, 8192
    largest = largest_tile(rows, 4, vocab)
    assert largest == 1024 * 2048 < rows * vocab


@pytest.mark.parametrize(
    ("vocab_chunk_size", "reduction"), [(None, "none"), (7, "none"), (7, "mean")]
)
def test_saved_tensors_are_inputs_and_per_row_numbers(vocab_chunk_size, reduction):
    # Full-vocabulary blocks with "mean" save the gradients instead (tested above).
    hidden, weight, bias, target = problem(rows=64, vocab=300)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(h, w, target, bias=b, reduction=reduction,
                             chunk_size=16, vocab_chunk_size=vocab_chunk_size)  # fmt: skip
    inputs = {t.untyped_storage().data_ptr() for t in (h, w, b)}
    others = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert len(others) < len(saved)
    assert all(t.numel() <= 64 for t in others)


# --------------------------------------------------------------------------------------
# random shapes
# --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 30),
    features=st.integers(1, 6),
    vocab=st.integers(1, 20),
    chunk=st.integers(1, 40),
    smoothing=st.sampled_from([0.0, 0.3]),
    cap=st.sampled_from([None, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_materialised(rows, features, vocab, chunk, smoothing, cap, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, features, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=g)
    if rows:
        target[torch.rand(rows, generator=g) < 0.3] = -100
    options = dict(label_smoothing=smoothing, softcap=cap, z_loss=1e-3)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h1, w1, target, chunk_size=chunk, **options)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = ops.cross_entropy(h2 @ w2.T, target, **options)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 30),
    features=st.integers(1, 6),
    vocab=st.integers(1, 40),
    chunk=st.integers(1, 40),
    vocab_chunk=st.integers(1, 45),
    smoothing=st.sampled_from([0.0, 0.3]),
    cap=st.sampled_from([None, 2.0]),
    reduction=st.sampled_from(["mean", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_vocabulary_tiles_match_materialised(
    rows, features, vocab, chunk, vocab_chunk, smoothing, cap, reduction, seed
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, features, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=g)
    if rows:
        target[torch.rand(rows, generator=g) < 0.3] = -100
    options = dict(label_smoothing=smoothing, softcap=cap, z_loss=1e-3)
    blocks = dict(chunk_size=chunk, vocab_chunk_size=vocab_chunk)
    loss, grads = loss_and_grads(ours, hidden, weight, bias, target, reduction,
                                 **blocks, **options)  # fmt: skip
    ref_loss, ref_grads = loss_and_grads(
        materialised, hidden, weight, bias, target, reduction, **options
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

H, W, T = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 4])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(hidden=H.long()), TypeError, "hidden must be a real floating-point"),
        (dict(weight=[1.0]), TypeError, "weight must be a torch.Tensor, got list"),
        (dict(target=T.float()), TypeError, "target must hold integer class indices"),
        (dict(target=T.bool()), TypeError, "target must hold integer class indices"),
        (dict(weight=torch.randn(5, 4)), ValueError, r"weight must have shape \(V, 3\)"),
        (dict(weight=W.double()), ValueError, "weight has dtype torch.float64"),
        (dict(target=T[:3]), ValueError, r"target must have shape \(4,\)"),
        (dict(target=torch.tensor([0, 1, 2, 5])), ValueError, "class index 5"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a float, got str"),
        (dict(z_loss=-1.0), ValueError, "z_loss must be a finite float >= 0, got -1.0"),
        (dict(softcap=0.0), ValueError, "softcap must be a positive finite float, got 0.0"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
        (dict(chunk_size=2.5), TypeError, "chunk_size must be an int or None, got float"),
        (dict(vocab_chunk_size=0), ValueError, "vocab_chunk_size must be >= 1, got 0"),
        (dict(vocab_chunk_size=True), TypeError, "vocab_chunk_size must be an int or None"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int, got float"),
    ],
)
def test_bad_input_raises(kwargs, error, message):
    args = dict(hidden=H, weight=W, target=T)
    args.update(kwargs)
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(error, match=message):
        linear_cross_entropy(hidden, weight, target, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_float64(dtype):
    hidden, weight, bias, target = problem(rows=300, vocab=1000, dtype=torch.float64)
    expected, expected_grads = loss_and_grads(materialised, hidden, weight, bias, target, "mean")
    cuda = [t.cuda().to(dtype) for t in (hidden, weight, bias)]
    loss, grads = loss_and_grads(ours, *cuda, target.cuda(), "mean", chunk_size=64)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_relative(loss.cpu(), expected, rtol)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_relative(got.cpu(), want, rtol)
