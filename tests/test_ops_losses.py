"""finite.ops.cross_entropy and binary_cross_entropy_with_logits against PyTorch
(evaluated in float64 on the same inputs), mpmath (50 digits) and float64 formulas."""

import itertools
import math

import mpmath
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from finite.ops import binary_cross_entropy_with_logits, cross_entropy, log_softmax, softmax

mpmath.mp.dps = 50
INF = math.inf
LOW_PRECISION = (torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def within_ulps(actual: torch.Tensor, reference: torch.Tensor, ulps: float) -> bool:
    """|actual - reference| <= ulps * ulp(reference) in actual's dtype, elementwise."""
    info = torch.finfo(actual.dtype)
    ref = reference.double()
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(info.tiny)))
    spacing = torch.exp2(exponent) * info.eps
    return bool(((actual.double() - ref).abs() <= ulps * spacing).all())


def class_problem(n=7, c=5, extra=(), seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, *extra, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, c, (n, *extra), generator=g)
    target.view(-1)[::3] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    probs = torch.softmax(torch.randn(n, c, *extra, generator=g, dtype=torch.float64), 1)
    return logits, target, weight, probs


# --------------------------------------------------------------------------------------
# cross_entropy: PyTorch semantics
# --------------------------------------------------------------------------------------

OPTIONS = list(
    itertools.product(["class", "probs"], [False, True], [0.0, 0.3], REDUCTIONS, [(), (2, 3)])
)


@pytest.mark.parametrize(("kind", "weighted", "smoothing", "reduction", "extra"), OPTIONS)
def test_cross_entropy_matches_torch_for_every_option(kind, weighted, smoothing, reduction, extra):
    logits, target, weight, probs = class_problem(extra=extra)
    tgt = target if kind == "class" else probs
    kwargs = dict(label_smoothing=smoothing, reduction=reduction)
    if weighted:
        kwargs["weight"] = weight
    leaf, ref_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = cross_entropy(leaf, tgt, **kwargs)
    theirs = F.cross_entropy(ref_leaf, tgt, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)
    upstream = torch.randn(ours.shape, dtype=torch.float64)
    ours.backward(upstream)
    theirs.backward(upstream)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-12, atol=1e-15)


def test_cross_entropy_of_one_dimensional_logits_takes_a_scalar_target():
    logits = torch.randn(6, dtype=torch.float64)
    target = torch.tensor(4)
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_custom_ignore_index_is_honoured():
    logits, target, _, _ = class_problem()
    target = target.clone()
    target[target == -100] = 3
    target[0] = 7
    ours = cross_entropy(logits, target, ignore_index=7, reduction="none")
    torch.testing.assert_close(
        ours, F.cross_entropy(logits, target, ignore_index=7, reduction="none")
    )


def test_probability_targets_are_differentiated():
    logits, _, weight, probs = class_problem()
    q, q_ref = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    cross_entropy(logits, q, weight=weight, label_smoothing=0.2).backward()
    F.cross_entropy(logits, q_ref, weight=weight, label_smoothing=0.2).backward()
    torch.testing.assert_close(q.grad, q_ref.grad)


@pytest.mark.parametrize("kind", ["class", "probs"])
def test_cross_entropy_gradcheck_with_every_term(kind):
    logits, target, weight, probs = class_problem(n=4, c=3)
    tgt = target if kind == "class" else probs
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(
            x, tgt, weight=weight, label_smoothing=0.2, z_loss=0.1, softcap=5.0
        ),
        (logits.requires_grad_(),),
    )


# --------------------------------------------------------------------------------------
# cross_entropy: additions and deviations
# --------------------------------------------------------------------------------------


def test_z_loss_adds_weighted_squared_logsumexp():
    logits, target, weight, _ = class_problem()
    leaf = logits.clone().requires_grad_()
    ours = cross_entropy(leaf, target, weight=weight, z_loss=1e-2)
    # Independent float64 formula: weighted NLL plus z * w_t * lse^2, over sum of w_t.
    ref_leaf = logits.clone().requires_grad_()
    keep = target != -100
    lse = torch.logsumexp(ref_leaf, 1)[keep]
    w_t = weight[target[keep]]
    nll = -ref_leaf.log_softmax(1)[keep].gather(1, target[keep, None]).squeeze(1)
    reference = (w_t * (nll + 1e-2 * lse**2)).sum() / w_t.sum()
    torch.testing.assert_close(ours, reference, rtol=1e-13, atol=0)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-12, atol=1e-15)


def test_z_loss_with_probability_targets_is_unweighted_per_row():
    logits, _, weight, probs = class_problem()
    ours = cross_entropy(logits, probs, weight=weight, z_loss=0.5, reduction="none")
    reference = F.cross_entropy(logits, probs, weight=weight, reduction="none")
    reference = reference + 0.5 * torch.logsumexp(logits, 1) ** 2
    torch.testing.assert_close(ours, reference, rtol=1e-13, atol=0)


def test_softcap_equals_manual_tanh_then_torch_cross_entropy():
    logits, target, _, _ = class_problem(scale=40.0)
    leaf, ref_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = cross_entropy(leaf, target, softcap=30.0)
    reference = F.cross_entropy(30.0 * torch.tanh(ref_leaf / 30.0), target)
    torch.testing.assert_close(ours, reference, rtol=1e-13, atol=0)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_over_all_ignored_targets_is_zero_with_zero_gradient(weighted):
    logits = torch.randn(4, 5, requires_grad=True)
    target = torch.full((4,), -100)
    weight = torch.rand(5) if weighted else None
    loss = cross_entropy(logits, target, weight=weight, label_smoothing=0.1, z_loss=1e-3)
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()
    assert F.cross_entropy(logits, target).isnan()  # the deviation this documents


def test_empty_batch_mean_is_zero():
    logits = torch.randn(0, 5, requires_grad=True)
    loss = cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 5)


def test_confident_prediction_keeps_its_tiny_loss_and_gradient():
    # p_t = 1 - e^-40 rounds to 1 in float32: torch's log_softmax gives a loss of 0.
    logits = torch.tensor([[40.0, 0.0]], requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([0]))
    loss.backward()
    tail = mpmath.exp(-40) / (1 + mpmath.exp(-40))
    exact_loss = mpmath.log1p(mpmath.exp(-40))
    assert within_ulps(loss, torch.tensor(float(exact_loss), dtype=torch.float64), 0.5)
    exact_grad = torch.tensor([[-float(tail), float(tail)]], dtype=torch.float64)
    assert within_ulps(logits.grad, exact_grad, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_is_within_one_ulp_of_the_float64_reference(dtype, reduction):
    logits, target, weight, _ = class_problem(n=32, c=11, dtype=dtype, scale=6.0)
    ours = cross_entropy(logits, target, weight=weight, reduction=reduction)
    reference = F.cross_entropy(logits.double(), target, weight=weight, reduction=reduction)
    assert ours.dtype == dtype
    assert within_ulps(ours, reference, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_gradient_is_within_one_ulp_of_the_float64_reference(dtype):
    logits, target, _, _ = class_problem(n=16, c=9, dtype=dtype, scale=5.0)
    leaf = logits.clone().requires_grad_()
    cross_entropy(leaf, target, reduction="sum").backward()
    ref_leaf = logits.double().requires_grad_()
    F.cross_entropy(ref_leaf, target, reduction="sum").backward()
    assert leaf.grad.dtype == dtype
    assert within_ulps(leaf.grad, ref_leaf.grad, 1.0)


def test_never_less_accurate_than_torch_in_float32():
    logits, target, _, _ = class_problem(n=64, c=50, dtype=torch.float32, scale=12.0)
    reference = F.cross_entropy(logits.double(), target, reduction="none")
    ours = (cross_entropy(logits, target, reduction="none").double() - reference).abs()
    theirs = (F.cross_entropy(logits, target, reduction="none").double() - reference).abs()
    assert ours.max() <= theirs.max()


def mp_cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor):
    """Exact per-row loss and gradient of the summed loss, as float64 tensors.

    ``lse - x_t`` and ``p_j - [j = t]`` with the sums split at the maximum so that
    50 digits suffice however confident the row is.
    """
    losses, grads = [], []
    for row, t in zip(logits.double().tolist(), target.tolist(), strict=True):
        if t == -100:
            losses.append(0.0)
            grads.append([0.0] * len(row))
            continue
        top = max(row)
        terms = [mpmath.exp(mpmath.mpf(v) - top) for v in row]
        total = mpmath.fsum(terms)
        others = mpmath.fsum(e for j, e in enumerate(terms) if j != t)
        # lse - x_t = log(total / e_t) = log1p(others / e_t)
        losses.append(float(mpmath.log1p(others / terms[t])))
        grads.append([float(-others / total if j == t else e / total) for j, e in enumerate(terms)])
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    st.sampled_from([1.0, 30.0, 1e4]),
    st.integers(0, 2**31 - 1),
)
def test_random_problems_match_mpmath_without_nan(n, c, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).clamp(-6e4, 6e4)
    logits = logits.to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.3] = -100
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf, target, reduction="none")
    loss.sum().backward()
    exact_loss, exact_grad = mp_cross_entropy_rows(logits, target)
    assert loss.isfinite().all() and leaf.grad.isfinite().all()
    tolerance = 2.0 if dtype == torch.float64 else 1.0
    assert within_ulps(loss, exact_loss, tolerance)
    assert within_ulps(leaf.grad, exact_grad, tolerance)


def test_output_dtype_follows_logits():
    for dtype in (torch.float64, torch.float32, *LOW_PRECISION):
        logits, target, _, probs = class_problem(dtype=dtype)
        assert cross_entropy(logits, target).dtype == dtype
        assert cross_entropy(logits, probs.to(dtype)).dtype == dtype


# --------------------------------------------------------------------------------------
# cross_entropy: bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(z_loss=math.nan), ValueError, "z_loss"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap="30"), TypeError, "softcap"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(weight=torch.ones(4)), ValueError, "weight"),
        (dict(weight=torch.ones(5, dtype=torch.int64)), TypeError, "weight"),
    ],
)
def test_bad_options_raise_naming_the_argument(kwargs, error, name):
    logits, target, _, _ = class_problem()
    with pytest.raises(error, match=name):
        cross_entropy(logits, target, **kwargs)


@pytest.mark.parametrize(
    ("logits", "target", "error"),
    [
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), TypeError),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool), TypeError),
        (torch.zeros(3, 4), torch.zeros(4, dtype=torch.int64), ValueError),
        (torch.zeros(3, 4), torch.zeros(3, 5), ValueError),
        (torch.zeros(()), torch.zeros((), dtype=torch.int64), ValueError),
        (torch.zeros(3, 0), torch.zeros(3, dtype=torch.int64), ValueError),
    ],
)
def test_bad_tensors_raise(logits, target, error):
    with pytest.raises(error, match=r"logits|target"):
        cross_entropy(logits, target)


@pytest.mark.parametrize("bad", [5, -1, -101])
def test_class_index_out_of_range_raises_on_cpu(bad):
    target = torch.tensor([0, bad, 2])
    with pytest.raises(ValueError, match="target"):
        cross_entropy(torch.zeros(3, 5), target)


# --------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pos_weight_shape", [None, (5,), (4, 5), (1, 1)])
def test_bce_matches_torch(reduction, pos_weight_shape):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64) * 4
    target = torch.rand(4, 5, generator=g, dtype=torch.float64)
    pos_weight = None
    if pos_weight_shape is not None:
        pos_weight = torch.rand(pos_weight_shape, generator=g, dtype=torch.float64) * 3
    leaf, ref_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    kwargs = dict(pos_weight=pos_weight, reduction=reduction)
    ours = binary_cross_entropy_with_logits(leaf, target, **kwargs)
    theirs = F.binary_cross_entropy_with_logits(ref_leaf, target, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)
    upstream = torch.randn(ours.shape, dtype=torch.float64)
    ours.backward(upstream)
    theirs.backward(upstream)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-12, atol=1e-15)


def test_bce_gradcheck_for_logits_target_and_pos_weight():
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target = torch.rand(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    pos_weight = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y, w: binary_cross_entropy_with_logits(x, y, pos_weight=w),
        (logits, target, pos_weight),
    )


def test_bce_is_finite_for_huge_logits():
    logits = torch.tensor([1e4, -1e4, 3e38, -3e38], requires_grad=True)
    target = torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss = binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss.sum().backward()
    assert torch.equal(loss.detach(), logits.detach().abs())
    assert logits.grad.tolist() == [1.0, -1.0, 1.0, -1.0]


def test_bce_gradient_keeps_the_tail_where_sigmoid_rounds_to_one():
    # torch: sigmoid(30) - 1 == 0 in float32; the exact gradient is -sigmoid(-30).
    logits = torch.tensor([30.0], requires_grad=True)
    binary_cross_entropy_with_logits(logits, torch.tensor([1.0]), reduction="sum").backward()
    exact = -mpmath.exp(-30) / (1 + mpmath.exp(-30))
    assert within_ulps(logits.grad, torch.tensor([float(exact)], dtype=torch.float64), 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_bce_low_precision_is_within_one_ulp(dtype):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(64, generator=g) * 8).to(dtype)
    target = torch.rand(64, generator=g).to(dtype)
    ours = binary_cross_entropy_with_logits(logits, target, reduction="none")
    reference = F.binary_cross_entropy_with_logits(
        logits.double(), target.double(), reduction="none"
    )
    assert ours.dtype == dtype
    assert within_ulps(ours, reference, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=8),
    st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    st.floats(0, 1),
)
def test_bce_random_inputs_never_nan(values, dtype, label):
    logits = torch.tensor(values, dtype=torch.float64).to(dtype).requires_grad_()
    target = torch.full(logits.shape, label, dtype=dtype)
    loss = binary_cross_entropy_with_logits(logits, target, reduction="sum")
    loss.backward()
    assert loss.isfinite() and logits.grad.isfinite().all()


@pytest.mark.parametrize(
    ("target", "pos_weight", "error", "name"),
    [
        (torch.zeros(3, dtype=torch.int64), None, TypeError, "target"),
        (torch.zeros(4), None, ValueError, "target"),
        (torch.zeros(3), torch.ones(2), ValueError, "pos_weight"),
        (torch.zeros(3), torch.ones(3, dtype=torch.int64), TypeError, "pos_weight"),
    ],
)
def test_bce_bad_input_raises(target, pos_weight, error, name):
    with pytest.raises(error, match=name):
        binary_cross_entropy_with_logits(torch.zeros(3), target, pos_weight=pos_weight)


def test_bce_bad_reduction_raises():
    with pytest.raises(ValueError, match="reduction"):
        binary_cross_entropy_with_logits(torch.zeros(3), torch.zeros(3), reduction="avg")


# --------------------------------------------------------------------------------------
# Autocast, compile, devices
# --------------------------------------------------------------------------------------


def test_cross_entropy_works_under_cpu_autocast():
    layer = torch.nn.Linear(8, 10)
    x = torch.randn(6, 8)
    target = torch.randint(0, 10, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        loss = cross_entropy(logits, target)
    assert logits.dtype == loss.dtype == torch.bfloat16
    reference = F.cross_entropy(logits.detach().double(), target)
    assert within_ulps(loss, reference, 1.0)
    loss.backward()
    assert layer.weight.grad.isfinite().all()


@pytest.mark.slow
def test_compiled_graph_matches_eager():
    x = torch.randn(8, 16)
    target = torch.randint(0, 16, (8,))

    def step(logits):
        return (
            cross_entropy(logits, target, z_loss=1e-3)
            + softmax(logits, -1).square().sum()
            + log_softmax(logits, -1, mask=logits > 0).clamp_min(-5).sum()
            + binary_cross_entropy_with_logits(logits, torch.sigmoid(logits.detach()))
        )

    eager_leaf, compiled_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = step(eager_leaf)
    eager.backward()
    compiled = torch.compile(step)(compiled_leaf)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_losses_match_cpu(dtype):
    logits, target, weight, probs = class_problem(n=64, c=300, dtype=dtype, scale=8.0)
    bce_target = torch.rand(64, 300).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        leaf = logits.to(device).detach().requires_grad_()
        loss = cross_entropy(
            leaf, target.to(device), weight=weight.to(device), label_smoothing=0.1, z_loss=1e-3
        )
        loss = loss + cross_entropy(leaf, probs.to(device, dtype))
        loss = loss + binary_cross_entropy_with_logits(leaf, bce_target.to(device))
        loss.backward()
        results.append((loss.cpu(), leaf.grad.cpu()))
    (loss_cpu, grad_cpu), (loss_cuda, grad_cuda) = results
    torch.testing.assert_close(loss_cuda, loss_cpu)
    torch.testing.assert_close(grad_cuda, grad_cpu)
