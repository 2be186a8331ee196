"""Checkpointing in place (bit-for-bit against the plain model) and the checkpoint planner.

Equality is exact (``torch.equal``): the reference is the same model run without
checkpointing from the same random state. Byte counts are worked out by hand from what
each op keeps for its backward.
"""

import copy
import io
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

from finite.memory import (
    CandidateCost,
    activation_memory,
    apply_checkpointing,
    checkpoint_sequential,
    is_checkpointed,
    plan_checkpointing,
    plan_table,
    remove_checkpointing,
    segment_bounds,
)
from finite.memory.planner import _solve_exact, _solve_greedy

F32 = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation, which stalls on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Block(nn.Module):
    def __init__(self, width=16, p=0.3):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.drop = nn.Dropout(p)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(self.drop(torch.tanh(self.up(x))))


def blocks_model(n=6, width=16, p=0.3):
    torch.manual_seed(0)
    return nn.Sequential(*(Block(width, p) for _ in range(n))).train()


def loss_and_grads(model, x, seed=1234):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_bit_equal(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.equal(ga, gb)


# --------------------------------------------------------------------------------------
# bit-for-bit equality
# --------------------------------------------------------------------------------------


def test_apply_checkpointing_with_dropout_is_bit_equal():
    model = blocks_model()
    x = torch.randn(32, 16)
    reference = loss_and_grads(model, x)
    assert apply_checkpointing(model, Block) == [str(i) for i in range(6)]
    assert_bit_equal(loss_and_grads(model, x), reference)


def test_checkpoint_sequential_sqrt_with_dropout_is_bit_equal():
    model = blocks_model(n=9)
    x = torch.randn(32, 16)
    reference = loss_and_grads(model, x)
    checkpoint_sequential(model, "sqrt")
    assert_bit_equal(loss_and_grads(model, x), reference)


def test_input_gradient_is_bit_equal():
    model = blocks_model()
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(7)
    model(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    apply_checkpointing(model, ["1", "3"])
    torch.manual_seed(7)
    model(x).sum().backward()
    assert torch.equal(x.grad, expected)


def test_random_stream_after_the_step_is_unchanged():
    # The recomputation replays the dropout masks without consuming new random numbers.
    model = blocks_model()
    x = torch.randn(8, 16)
    loss_and_grads(model, x)
    expected = torch.rand(5)
    apply_checkpointing(model, Block)
    loss_and_grads(model, x)
    assert torch.equal(torch.rand(5), expected)


def test_keyword_arguments_pass_through():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, *, factor):
            return self.lin(x) * factor

    model = nn.Sequential()
    model.add_module("s", Scale())
    x = torch.randn(3, 4)
    expected = torch.autograd.grad(model.s(x, factor=2.5).sum(), model.s.lin.weight)[0]
    apply_checkpointing(model, ["s"])
    got = torch.autograd.grad(model.s(x, factor=2.5).sum(), model.s.lin.weight)[0]
    assert torch.equal(got, expected)


def test_forward_without_gradients_still_works():
    model = blocks_model()
    x = torch.randn(4, 16)
    model.eval()
    expected = model(x)
    apply_checkpointing(model, Block)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# --------------------------------------------------------------------------------------
# memory and segments
# --------------------------------------------------------------------------------------


def tanh_chain(n):
    return nn.Sequential(*(nn.Tanh() for _ in range(n)))


def test_tanh_chain_without_checkpointing_keeps_every_output():
    x = torch.randn(10, 6, requires_grad=True)
    assert activation_memory(tanh_chain(9), x).total_bytes == 9 * 10 * 6 * F32


def test_checkpoint_sequential_keeps_segment_inputs_and_last_segment():
    # 3 segments of 3: the inputs of segments 1 and 2 (x and the 3rd output), and the
    # 3 outputs of the last segment, which is not checkpointed.
    x = torch.randn(10, 6, requires_grad=True)
    model = checkpoint_sequential(tanh_chain(9), 3)
    assert activation_memory(model, x).total_bytes == 5 * 10 * 6 * F32


def test_checkpointing_each_tanh_alone_saves_nothing():
    # Checkpointing Tanh 0..7 individually: each keeps its input instead of its output;
    # the inputs are x and the outputs 0..6, the last Tanh keeps its output: 9 tensors.
    x = torch.randn(10, 6, requires_grad=True)
    model = tanh_chain(9)
    apply_checkpointing(model, [str(i) for i in range(8)])
    assert activation_memory(model, x).total_bytes == 9 * 10 * 6 * F32


def test_segments_are_balanced_longer_first():
    model = checkpoint_sequential(tanh_chain(10), 3)
    assert segment_bounds(model) == [(0, 4), (4, 7), (7, 10)]


def test_sqrt_segments():
    assert len(segment_bounds(checkpoint_sequential(tanh_chain(32), "sqrt"))) == 6
    assert len(segment_bounds(checkpoint_sequential(tanh_chain(16), "sqrt"))) == 4


@pytest.mark.parametrize(
    ("segments", "error", "message"),
    [
        (0, ValueError, r"segments must be in \[1, 4\]"),
        (5, ValueError, r"segments must be in \[1, 4\]"),
        ("cube", ValueError, "segments must be an int or 'sqrt', got 'cube'"),
        (2.0, TypeError, "segments must be an int or 'sqrt', got float"),
        (True, TypeError, "got bool"),
    ],
)
def test_bad_segments_raise(segments, error, message):
    with pytest.raises(error, match=message):
        checkpoint_sequential(tanh_chain(4), segments)


def test_checkpoint_sequential_needs_a_sequential():
    with pytest.raises(TypeError, match=r"seq must be a torch\.nn\.Sequential, got Linear"):
        checkpoint_sequential(nn.Linear(2, 2))


def test_empty_sequential_raises():
    with pytest.raises(ValueError, match="seq is empty"):
        checkpoint_sequential(nn.Sequential())


# --------------------------------------------------------------------------------------
# targets, state, undo
# --------------------------------------------------------------------------------------


def test_targets_by_predicate():
    model = blocks_model()
    chosen = apply_checkpointing(model, lambda path, module: path in {"0", "5"})
    assert chosen == ["0", "5"]


def test_targets_by_type_tuple_select_leaves():
    model = blocks_model(n=2)
    assert apply_checkpointing(model, (nn.Linear,)) == ["0.up", "0.down", "1.up", "1.down"]


def test_outer_target_wins_over_nested():
    model = blocks_model(n=2)
    assert apply_checkpointing(model, ["0", "0.up", "1.down"]) == ["0", "1.down"]
    assert not is_checkpointed(model[0].up)


def test_unknown_path_raises():
    with pytest.raises(ValueError, match=r"targets names no module of the model: \['9'\]"):
        apply_checkpointing(blocks_model(n=2), ["0", "9"])


@pytest.mark.parametrize("targets", [3, [1, 2], (int,)])
def test_bad_targets_raise_type_error(targets):
    with pytest.raises(TypeError, match="targets"):
        apply_checkpointing(blocks_model(n=2), targets)


def test_state_dict_keys_unchanged():
    model = blocks_model()
    keys = list(model.state_dict())
    apply_checkpointing(model, Block)
    checkpoint_sequential(model, 2)
    assert list(model.state_dict()) == keys


def test_remove_checkpointing_restores_the_class_forward():
    model = blocks_model(n=3)
    apply_checkpointing(model, Block)
    checkpoint_sequential(model, 2)
    assert sorted(remove_checkpointing(model)) == ["", "0", "1", "2"]
    assert not any(is_checkpointed(m) for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_deepcopy_of_a_checkpointed_model_runs_its_own_parameters():
    model = blocks_model(n=3)
    apply_checkpointing(model, Block)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    x = torch.randn(4, 16)
    clone.eval()
    assert torch.equal(clone(x), x)  # residual blocks with zero weights: identity
    assert is_checkpointed(clone[0])


def test_saved_and_loaded_model_stays_checkpointed():
    x = torch.randn(10, 6, requires_grad=True)
    model = checkpoint_sequential(tanh_chain(9), 3)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert segment_bounds(loaded) == [(0, 3), (3, 6), (6, 9)]
    assert activation_memory(loaded, x).total_bytes == 5 * 10 * 6 * F32


# --------------------------------------------------------------------------------------
# planner
# --------------------------------------------------------------------------------------


def sixteen_blocks():
    # Each block keeps its input (rows x 32) and its Tanh output (rows x 64).
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32)) for _ in range(16))
    )


def test_sixteen_blocks_baseline():
    x = torch.randn(64, 32)
    assert activation_memory(sixteen_blocks(), x).total_bytes == 16 * 64 * (32 + 64) * F32


def test_planner_meets_budget_on_sixteen_blocks():
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    baseline = activation_memory(model, x).total_bytes
    budget = baseline // 2
    plan = plan_checkpointing(model, x, budget)
    assert plan.baseline_bytes == baseline
    assert plan.fits and plan.measured_bytes <= budget
    assert plan.method == "exact"


def test_planner_measured_bytes_match_applying_the_plan():
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan = plan_checkpointing(model, x, activation_memory(model, x).total_bytes // 2)
    assert not any(is_checkpointed(m) for m in model.modules())  # planning changes nothing
    plan.apply(model)
    assert activation_memory(model, x).total_bytes == plan.measured_bytes
    # Blocks that share no tensor: the per-block savings add up exactly.
    assert plan.predicted_bytes == plan.measured_bytes


def test_planner_saving_per_block_is_its_tanh_output():
    # Checkpointed, a block keeps its input only: it saves the Tanh output's bytes.
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan = plan_checkpointing(model, x, 10**12)
    assert [c.saved_bytes for c in plan.candidates] == [64 * 64 * F32] * 16
    assert plan.chosen == ()


def test_planner_chooses_the_number_of_blocks_the_budget_needs():
    # Need 16 * 64 * 96 * 4 / 2 bytes saved at 64 * 64 * 4 per block: 12 blocks.
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan = plan_checkpointing(model, x, 16 * 64 * 96 * F32 // 2)
    assert len(plan.chosen) == 12


def test_planner_impossible_budget_raises_with_the_reachable_minimum():
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    with pytest.raises(ValueError, match=r"budget_bytes=1000 .* below the smallest"):
        plan_checkpointing(model, x, 1000)


def test_planner_without_candidates_raises():
    with pytest.raises(ValueError, match="no candidate module"):
        plan_checkpointing(nn.Linear(2, 2), torch.randn(1, 2), 0)


@pytest.mark.parametrize(
    ("budget", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_planner_bad_budget_raises(budget, error):
    with pytest.raises(error, match="budget_bytes"):
        plan_checkpointing(sixteen_blocks(), torch.randn(2, 32), budget)


def brute_force(items, need):
    best = None
    for r in range(len(items) + 1):
        for subset in itertools.combinations(items, r):
            if sum(c.saved_bytes for c in subset) >= need:
                cost = sum(c.forward_seconds for c in subset)
                if best is None or cost < best:
                    best = cost
    return best


items_strategy = st.lists(
    st.tuples(st.integers(1, 1000), st.integers(1, 1000)), min_size=1, max_size=9
)


@settings(max_examples=60, deadline=None)
@given(items_strategy, st.floats(0.0, 1.0))
def test_exact_solver_matches_brute_force(pairs, fraction):
    items = [CandidateCost(str(i), b, t / 1000) for i, (b, t) in enumerate(pairs)]
    need = max(1, int(fraction * sum(b for b, _ in pairs)))
    chosen = _solve_exact(items, need)
    assert sum(c.saved_bytes for c in chosen) >= need
    assert sum(c.forward_seconds for c in chosen) == pytest.approx(brute_force(items, need))


@settings(max_examples=60, deadline=None)
@given(items_strategy, st.floats(0.0, 1.0))
def test_greedy_solver_meets_the_requirement(pairs, fraction):
    items = [CandidateCost(str(i), b, t / 1000) for i, (b, t) in enumerate(pairs)]
    need = max(1, int(fraction * sum(b for b, _ in pairs)))
    chosen = _solve_greedy(items, need)
    assert sum(c.saved_bytes for c in chosen) >= need
    # Nothing chosen can be dropped without missing the requirement.
    total = sum(c.saved_bytes for c in chosen)
    assert all(total - c.saved_bytes < need for c in chosen)


def test_plan_table_lists_candidates_and_totals():
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan = plan_checkpointing(model, x, 16 * 64 * 96 * F32 // 2, repeats=1)
    console = Console(width=120, record=True)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "15" in text and "measured" in text and "predicted" in text
    assert text.count("yes") == len(plan.chosen)
