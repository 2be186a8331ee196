"""Checkpointing in place (bit-for-bit against the plain model) and the checkpoint planner.

Equality is exact (``torch.equal``): the reference is the same model run without
checkpointing from the same random state. Byte counts are worked out by hand from what
each op keeps for its backward.
"""

import copy
import io
import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

from finite.memory import (
    activation_memory,
    apply_checkpointing,
    checkpoint_sequential,
    is_checkpointed,
    plan_checkpointing,
    plan_table,
    planner,
    remove_checkpointing,
    segment_bounds,
)
from finite.memory.planner import _solve_exact, _solve_greedy

F32 = 4


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_segments_are_balanced_longer_last():
    # The last segment is not recomputed: giving it the extra layer recomputes one less.
    model = checkpoint_sequential(tanh_chain(10), 3)
    assert segment_bounds(model) == [(0, 3), (3, 6), (6, 10)]


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
# segments: consecutive children checkpointed as one
# --------------------------------------------------------------------------------------


def test_segment_with_dropout_is_bit_equal():
    model = blocks_model(n=6)
    x = torch.randn(32, 16)
    reference = loss_and_grads(model, x)
    assert apply_checkpointing(model, ["[0:3]", "[3:5]"]) == ["[0:3]", "[3:5]"]
    assert_bit_equal(loss_and_grads(model, x), reference)


def test_segments_keep_only_their_inputs():
    # Segments [0:3] and [3:6] of nine Tanh keep x and the 3rd output (their inputs) and
    # the outputs of Tanh 6, 7, 8; checkpointed one by one they keep all nine tensors.
    x = torch.randn(10, 6, requires_grad=True)
    model = tanh_chain(9)
    apply_checkpointing(model, ["[0:3]", "[3:6]"])
    assert activation_memory(model, x).total_bytes == 5 * 10 * 6 * F32


class ScaleBlock(nn.Module):
    """Keeps its input (Linear), its Tanh output and its dropout mask: 3 x 512 B at 8 x 16."""

    def __init__(self, width=16):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, scale):
        return self.drop(torch.tanh(self.lin(x))) * scale


class ModuleListChain(nn.Module):
    """Blocks in a ModuleList, called in order with the same extra argument."""

    def __init__(self, n=8, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(ScaleBlock(width) for _ in range(n))

    def forward(self, x, scale):
        for block in self.blocks:
            x = block(x, scale)
        return x.square().mean()


class KeepsEveryOutput(ModuleListChain):
    """Uses every block's output again after the loop (a DenseNet-like sum)."""

    def forward(self, x, scale):
        outputs = []
        for block in self.blocks:
            x = block(x, scale)
            outputs.append(x)
        return torch.stack(outputs).square().mean()


def test_module_list_segment_with_extra_argument_is_bit_equal():
    model = ModuleListChain()
    x, scale = torch.randn(8, 16), torch.tensor(0.5)

    def run():
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        loss = model(x, scale)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    reference = run()
    apply_checkpointing(model, ["blocks[1:4]"])
    assert_bit_equal(run(), reference)


def test_segment_member_called_with_another_input_raises():
    # After the segment ran, block 1 must receive the segment's output; anything else
    # would silently skip block 0's result.
    model = ModuleListChain()
    apply_checkpointing(model, ["blocks[0:2]"])
    x, scale = torch.randn(4, 16), torch.tensor(0.5)
    model.blocks[0](x, scale)
    with pytest.raises(RuntimeError, match=r"segment 'blocks\[0:2\]' was called"):
        model.blocks[1](x, scale)


def test_segment_with_other_extra_argument_raises():
    model = ModuleListChain()
    apply_checkpointing(model, ["blocks[0:2]"])
    x = torch.randn(4, 16)
    y = model.blocks[0](x, torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="not run the segment as a chain"):
        model.blocks[1](y, torch.tensor(0.5))


class ReturnsPair(nn.Module):
    def forward(self, x):
        return x, x.sum()


def test_segment_returning_a_tuple_raises():
    model = nn.Sequential(nn.Linear(4, 4), ReturnsPair())
    apply_checkpointing(model, ["[0:2]"])
    with pytest.raises(RuntimeError, match=r"segment '\[0:2\]' returned a tuple"):
        model(torch.randn(2, 4))


def test_segment_without_gradients_runs_each_module():
    model = ModuleListChain().eval()
    x, scale = torch.randn(4, 16), torch.tensor(0.5)
    with torch.no_grad():
        expected = model(x, scale)
        apply_checkpointing(model, ["blocks[0:3]"])
        assert torch.equal(model(x, scale), expected)


def test_removing_a_segment_member_restores_the_whole_segment():
    # A member restored alone would run twice: once in the segment, once by the parent.
    model = blocks_model(n=4)
    apply_checkpointing(model, ["[1:4]"])
    assert remove_checkpointing(model[2]) == [""]
    assert not any(is_checkpointed(m) for m in model.modules())


def test_remove_checkpointing_lists_every_member_of_a_segment():
    model = blocks_model(n=4)
    apply_checkpointing(model, ["[1:4]"])
    assert sorted(remove_checkpointing(model)) == ["1", "2", "3"]


def test_deepcopy_and_save_keep_a_segment():
    x = torch.randn(10, 6, requires_grad=True)
    model = tanh_chain(9)
    apply_checkpointing(model, ["[0:3]", "[3:6]"])
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(model), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(is_checkpointed(loaded[i]) for i in range(6))
    assert activation_memory(loaded, x).total_bytes == 5 * 10 * 6 * F32


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["[2:2]"], r"need 0 <= start < stop <= 4 \(the length of the model\), got \[2:2\]"),
        (["[0:5]"], r"got \[0:5\]"),
        (["0[0:1]"], r"'0' must name an nn.Sequential or nn.ModuleList of the model, got Block"),
        (["x[0:1]"], "got no module"),
        (["[0:2]", "[1:3]"], r"segments '\[0:2\]' and '\[1:3\]' overlap"),
    ],
)
def test_bad_segments_raise_value_error(targets, message):
    with pytest.raises(ValueError, match=message):
        apply_checkpointing(blocks_model(n=4), targets)


# --------------------------------------------------------------------------------------
# planner
# --------------------------------------------------------------------------------------

KIB = 1024


def sixteen_blocks(dropout=None):
    # With 64 rows, each block keeps its input (8 KiB) and its Tanh output (16 KiB).
    torch.manual_seed(0)
    tail = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32), *tail) for _ in range(16))
    )


@pytest.fixture
def unit_seconds(monkeypatch):
    """Every candidate's forward takes 1 s: the optimum can be worked out by hand."""

    def seconds(model, paths, args, kwargs, repeats):
        return dict.fromkeys(paths, 1.0)

    monkeypatch.setattr(planner, "_module_forward_seconds", seconds)


def test_sixteen_blocks_baseline():
    x = torch.randn(64, 32)
    assert activation_memory(sixteen_blocks(), x).total_bytes == 16 * 24 * KIB


def test_planner_meets_budget_on_sixteen_blocks():
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    budget = activation_memory(model, x).total_bytes // 2
    plan = plan_checkpointing(model, x, budget)
    assert plan.method == "exact"
    assert plan.fits and plan.measured_bytes + plan.recompute_bytes <= budget
    assert plan.predicted_bytes == plan.measured_bytes
    plan.apply(model)
    assert activation_memory(model, x).total_bytes == plan.predicted_bytes


def test_planning_leaves_the_model_unchanged():
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan_checkpointing(model, x, 192 * KIB)
    assert not any(is_checkpointed(m) for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_planner_saving_per_block_is_its_tanh_output():
    # Checkpointed alone, a block keeps its input only: it saves the Tanh output's bytes,
    # and recomputing it brings them back.
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan = plan_checkpointing(model, x, 10**12)
    assert [c.saved_bytes for c in plan.candidates] == [16 * KIB] * 16
    assert [c.recompute_bytes for c in plan.candidates] == [16 * KIB] * 16
    assert plan.chosen == ()


def test_single_blocks_need_thirteen_for_half_the_activations(unit_seconds):
    # Budget 192 KiB of 384: kept + largest recompute <= 192, i.e. (k - 1) * 16 >= 192.
    model = sixteen_blocks()
    plan = plan_checkpointing(model, torch.randn(64, 32), 192 * KIB, segments=False)
    assert len(plan.chosen) == 13
    assert plan.predicted_bytes == plan.measured_bytes == (384 - 13 * 16) * KIB


def test_segments_beat_single_blocks(unit_seconds):
    # A segment of L blocks saves 16 L KiB of Tanh outputs and the L - 1 inputs inside it
    # (8 KiB each): 24 L - 8 KiB, and recomputes as much. Savings minus the largest
    # segment must reach 192 KiB: six pairs (240 - 40 = 200) do it with 12 blocks, which
    # no 11 blocks can (e.g. four triples also need 12); single blocks need 13. Of the
    # 12-block choices, six pairs have the smallest peak: 384 - 240 + 40 = 184 KiB.
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan = plan_checkpointing(model, x, 192 * KIB)
    assert plan.recompute_seconds == 12.0
    assert len(plan.chosen) == 6 and all(name.startswith("[") for name in plan.chosen)
    assert plan.predicted_bytes == plan.measured_bytes == (384 - 240) * KIB
    assert plan.recompute_bytes == 40 * KIB and plan.peak_bytes == 184 * KIB
    plan.apply(model)
    assert activation_memory(model, x).total_bytes == plan.predicted_bytes


def test_planned_segments_with_dropout_are_bit_equal(unit_seconds):
    model = sixteen_blocks(dropout=0.2)
    x = torch.randn(64, 32)
    reference = loss_and_grads(model, x)
    budget = activation_memory(model, x).total_bytes // 2
    plan = plan_checkpointing(model, x, budget)
    assert any(name.startswith("[") for name in plan.chosen)
    plan.apply(model)
    assert_bit_equal(loss_and_grads(model, x), reference)


def test_planner_forms_segments_in_a_module_list_run_as_a_chain(unit_seconds):
    # 8 blocks, tensors of 512 B; always kept: the loss's input (512) and scale (4).
    # Single blocks at best keep 8 inputs and recompute 2 tensors: 4096 + 516 + 1024 =
    # 5636 B. Four pairs keep 4 inputs and recompute 5 tensors: 2048 + 516 + 2560 = 5124.
    model = ModuleListChain(n=8)
    args = (torch.randn(8, 16), torch.tensor(0.5))
    plan = plan_checkpointing(model, args, 5400)
    assert plan.chosen == ("blocks[0:2]", "blocks[2:4]", "blocks[4:6]", "blocks[6:8]")
    assert plan.predicted_bytes == plan.measured_bytes == 2048 + 516
    with pytest.raises(ValueError, match="5636"):
        plan_checkpointing(model, args, 5400, segments=False)


def test_planner_forms_no_segment_when_outputs_are_used_again(unit_seconds):
    # Fusing blocks would hand the parent a later block's output in place of an earlier
    # one's, so only single blocks are candidates here.
    model = KeepsEveryOutput(n=8)
    args = (torch.randn(8, 16), torch.tensor(0.5))
    budget = 2 * activation_memory(model, *args).total_bytes // 3
    plan = plan_checkpointing(model, args, budget)
    assert plan.chosen and all(name.startswith("blocks.") for name in plan.chosen)


class ScalesBetweenBlocks(ModuleListChain):
    """Changes x between two blocks: block i + 1 does not receive block i's output."""

    def forward(self, x, scale):
        for block in self.blocks:
            x = block(x, scale) * 2.0
        return x.square().mean()


def test_planner_forms_no_segment_when_the_parent_changes_the_output(unit_seconds):
    model = ScalesBetweenBlocks(n=8)
    args = (torch.randn(8, 16), torch.tensor(0.5))
    budget = 2 * activation_memory(model, *args).total_bytes // 3
    plan = plan_checkpointing(model, args, budget)
    assert plan.chosen and all(name.startswith("blocks.") for name in plan.chosen)


def test_planner_impossible_budget_raises_with_the_reachable_minimum():
    # Best: eight pairs keep their 8 inputs (64 KiB) and recompute 40 KiB at a time:
    # 104 KiB = 106496 bytes. Single blocks: 16 inputs (128 KiB) + 16 KiB = 147456 bytes.
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    with pytest.raises(ValueError, match=r"budget_bytes=1000 .* below the smallest .*106496"):
        plan_checkpointing(model, x, 1000)
    with pytest.raises(ValueError, match=r"budget_bytes=1000 .* below the smallest .*147456"):
        plan_checkpointing(model, x, 1000, segments=False)


def test_planner_without_candidates_raises():
    with pytest.raises(ValueError, match="no candidate module"):
        plan_checkpointing(nn.Linear(2, 2), torch.randn(1, 2), 0)


def test_planner_rejects_segment_targets():
    with pytest.raises(ValueError, match="name modules, not segments"):
        plan_checkpointing(sixteen_blocks(), torch.randn(2, 32), 0, targets=["[0:2]"])


@pytest.mark.parametrize(
    ("budget", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_planner_bad_budget_raises(budget, error):
    with pytest.raises(error, match="budget_bytes"):
        plan_checkpointing(sixteen_blocks(), torch.randn(2, 32), budget)


@pytest.mark.parametrize("segments", ["yes", 1, None])
def test_planner_rejects_a_segments_flag_that_is_not_a_bool(segments):
    with pytest.raises(TypeError, match="segments must be a bool, got"):
        plan_checkpointing(sixteen_blocks(), torch.randn(2, 32), 10**6, segments=segments)


def make_intervals(chains, values):
    """Every interval [i:j) of chains of the given lengths, with drawn costs."""
    intervals, k = [], 0
    for c, length in enumerate(chains):
        for start in range(length):
            for stop in range(start + 1, length + 1):
                saved, rebuilt, millis = values[k % len(values)]
                k += 1
                units = tuple(range(start, stop))
                name = f"{c}[{start}:{stop}]"
                intervals.append(
                    planner._Interval(name, c, start, stop, units, saved, rebuilt, millis / 1e3)
                )
    return intervals


def brute_force(intervals, need):
    """Least time over disjoint interval sets with sum(saved) >= need + max(recompute)."""
    best = None
    for r in range(1, len(intervals) + 1):
        for subset in itertools.combinations(intervals, r):
            spans = sorted((i.chain, i.start, i.stop) for i in subset)
            if any(a[0] == b[0] and b[1] < a[2] for a, b in itertools.pairwise(spans)):
                continue
            if sum(i.saved_bytes for i in subset) >= need + max(i.recompute_bytes for i in subset):
                cost = sum(i.seconds for i in subset)
                best = cost if best is None else min(best, cost)
    return best


chains_strategy = st.lists(st.integers(1, 4), min_size=1, max_size=2).filter(
    lambda c: sum(n * (n + 1) // 2 for n in c) <= 13
)
values_strategy = st.lists(
    st.tuples(st.integers(-50, 1000), st.integers(1, 1000), st.integers(1, 1000)),
    min_size=1,
    max_size=13,
)


@settings(max_examples=60, deadline=None)
@given(chains_strategy, values_strategy, st.floats(0.0, 1.0))
def test_exact_solver_matches_brute_force(chains, values, fraction):
    intervals = make_intervals(chains, values)
    need = max(1, int(fraction * sum(max(i.saved_bytes, 0) for i in intervals) / 2))
    chosen = _solve_exact(intervals, need)
    expected = brute_force(intervals, need)
    if expected is None:
        assert chosen is None
    else:
        assert sum(i.seconds for i in chosen) == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(chains_strategy, values_strategy, st.floats(0.0, 1.0))
def test_greedy_solver_meets_the_requirement_with_disjoint_intervals(chains, values, fraction):
    intervals = make_intervals(chains, values)
    need = max(1, int(fraction * sum(max(i.saved_bytes, 0) for i in intervals) / 2))
    chosen = _solve_greedy(intervals, need)
    if chosen is None:
        return
    assert sum(i.saved_bytes for i in chosen) >= need + max(i.recompute_bytes for i in chosen)
    used = [(i.chain, u) for i in chosen for u in i.units]
    assert len(used) == len(set(used))


def test_plan_table_lists_candidates_and_totals():
    model = sixteen_blocks()
    x = torch.randn(64, 32)
    plan = plan_checkpointing(model, x, 192 * KIB, repeats=1, segments=False)
    console = Console(width=120, record=True)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "15" in text and "measured" in text and "predicted" in text
    assert text.count("yes") == len(plan.chosen)


def test_plan_table_shows_chosen_segments_and_the_blocks_inside_them(unit_seconds):
    model = sixteen_blocks()
    plan = plan_checkpointing(model, torch.randn(64, 32), 192 * KIB)
    console = Console(width=160, record=True)
    console.print(plan_table(plan))
    text = console.export_text()
    for name in plan.chosen:  # six pairs "[i:i+2]"
        start, stop = (int(b) for b in name[1:-1].split(":"))
        assert re.search(rf"^\W*{re.escape(name)}\s.*yes", text, re.MULTILINE), name
        for block in range(start, stop):
            assert re.search(rf"^\W*{block}\s.*in {re.escape(name)}", text, re.MULTILINE)
    assert "peak (within budget)" in text
