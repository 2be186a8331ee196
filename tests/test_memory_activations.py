"""finite.memory.activation_memory against byte counts worked out by hand.

Each expected size comes from what the op's backward needs (Linear keeps its input,
sigmoid and ReLU their output, sin its input), times the element size, per storage.
"""

import pytest
import torch
from rich.console import Console
from torch import nn

from finite.memory import activation_memory, activation_table

F32 = 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_linear_keeps_its_input():
    model = nn.Linear(8, 16)
    report = activation_memory(model, torch.randn(4, 8))
    assert report.total_bytes == 4 * 8 * F32
    assert dict(report.by_module) == {"": 4 * 8 * F32}


def test_linear_then_sigmoid_by_module():
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid())
    report = activation_memory(model, torch.randn(4, 8))
    assert dict(report.by_module) == {"0": 4 * 8 * F32, "1": 4 * 16 * F32}
    assert report.total_bytes == 4 * 8 * F32 + 4 * 16 * F32


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_output_shared_with_next_linear_counts_once(inplace):
    # ReLU keeps its output; the next Linear keeps the same tensor as its input.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 4))
    report = activation_memory(model, torch.randn(5, 8))
    assert dict(report.by_module) == {"0": 5 * 8 * F32, "1": 5 * 16 * F32}
    assert report.total_bytes == 5 * 8 * F32 + 5 * 16 * F32


def test_inplace_relu_storage_is_the_linear_output():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True))
    report = activation_memory(model, torch.randn(5, 8))
    relu = [s for s in report.storages if s.module == "1"]
    assert len(relu) == 1
    assert relu[0].nbytes == 5 * 16 * F32
    assert relu[0].shape == (5, 16)


def test_views_of_one_storage_count_once():
    # sin keeps its input: the transpose and the slice are views of x's storage.
    model = Lambda(lambda x: torch.sin(x.t()).sum() + torch.cos(x[:2]).sum())
    x = torch.randn(4, 8, requires_grad=True)
    report = activation_memory(model, x)
    assert report.total_bytes == 4 * 8 * F32
    assert len(report.storages) == 1
    assert report.storages[0].saves == 2


def test_a_saved_slice_counts_its_whole_storage():
    x = torch.randn(10, 10, dtype=torch.float64, requires_grad=True)
    report = activation_memory(Lambda(lambda t: torch.sin(t[:1])), x)
    assert report.total_bytes == 10 * 10 * 8


def test_tensor_shared_by_two_modules_counts_for_the_first():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Lambda(torch.sin)
            self.b = Lambda(torch.cos)

        def forward(self, x):
            return self.a(x) + self.b(x)

    x = torch.randn(3, 7, requires_grad=True)
    report = activation_memory(Two(), x)
    assert dict(report.by_module) == {"a": 3 * 7 * F32}
    assert report.storages[0].saves == 2


def test_innermost_module_gets_the_bytes():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Sigmoid())

        def forward(self, x):
            return self.inner(torch.sin(x))  # sin runs in Outer itself

    x = torch.randn(6, 5, requires_grad=True)
    report = activation_memory(Outer(), x)
    assert dict(report.by_module) == {"": 6 * 5 * F32, "inner.0": 6 * 5 * F32}
    assert report.inclusive_bytes("inner") == 6 * 5 * F32
    assert report.inclusive_bytes("") == 2 * 6 * 5 * F32


def test_parameters_are_reported_apart():
    model = nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8, requires_grad=True)  # the input's gradient needs the weight
    report = activation_memory(model, x)
    assert report.total_bytes == 4 * 8 * F32
    assert report.parameter_bytes == 16 * 8 * F32


def test_dropped_branch_is_not_counted():
    def forward(x):
        torch.exp(x)  # exp keeps its output, but the result is dropped at once
        return torch.sin(x)

    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    report = activation_memory(Lambda(forward), x)
    assert report.total_bytes == 4 * 4 * 8


def test_dtype_sets_the_size():
    x = torch.randn(3, 5, dtype=torch.float16, requires_grad=True)
    report = activation_memory(nn.Sigmoid(), x)
    assert report.total_bytes == 3 * 5 * 2
    assert report.storages[0].dtype == torch.float16


def test_nothing_saved_without_gradients_anywhere():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).requires_grad_(False)
    assert activation_memory(model, torch.randn(2, 8)).total_bytes == 0


def test_keyword_arguments_reach_the_model():
    class Scaled(nn.Module):
        def forward(self, x, *, power):
            return torch.pow(x, power)

    x = torch.randn(3, 3, requires_grad=True)
    # pow keeps its input (and not its output) for the gradient.
    assert activation_memory(Scaled(), x, power=3).total_bytes == 3 * 3 * F32


def test_buffers_are_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    activation_memory(model, torch.randn(8, 4) * 5 + 3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_random_state_is_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    x = torch.randn(8, 4)
    state = torch.get_rng_state()
    activation_memory(model, x)
    assert torch.equal(torch.get_rng_state(), state)


def test_hooks_are_removed_even_when_the_forward_raises():
    def fail(x):
        raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(2, 2), Lambda(fail))
    with pytest.raises(RuntimeError, match="boom"):
        activation_memory(model, torch.randn(1, 2))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_not_a_module_raises_type_error():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"):
        activation_memory(lambda x: x, torch.randn(2))


def test_unknown_path_for_inclusive_bytes_raises():
    report = activation_memory(nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(ValueError, match="'nope'"):
        report.inclusive_bytes("nope")


def test_table_lists_modules_and_total():
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid())
    report = activation_memory(model, torch.randn(4, 8))
    console = Console(width=120, record=True)
    console.print(activation_table(report))
    text = console.export_text()
    assert "Sigmoid" in text and "Linear" in text
    assert "total" in text and "384" in text


def test_cpu_report_has_no_device_numbers():
    report = activation_memory(nn.Sigmoid(), torch.randn(2, requires_grad=True))
    assert report.device_allocated_bytes is None
    assert report.device_agreement is None


@pytest.mark.cuda
def test_cuda_allocation_agrees_with_saved_bytes():
    # Saved: the Linear's input (existing before, not in the allocation growth), the
    # Sigmoid's output (new); the Linear's output is freed once the Sigmoid has run.
    model = nn.Sequential(nn.Linear(256, 1024), nn.Sigmoid(), nn.Linear(1024, 8)).cuda()
    x = torch.randn(512, 256, device="cuda")
    report = activation_memory(model, x)
    sigmoid_bytes = 512 * 1024 * F32
    assert report.total_bytes == 512 * 256 * F32 + sigmoid_bytes
    # The output (512 x 8) is held too; the caching allocator rounds block sizes.
    assert abs(report.device_allocated_bytes - sigmoid_bytes) <= 64 * 1024
