"""NaN/Inf provenance on planted faults: the origin is named exactly, propagators are not blamed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from finite.monitor import Monitor, NonfiniteEvent, locate

D = 8
FAULTY = "encoder.layers.1.attn"


pytestmark = pytest.mark.usefixtures("one_thread")


class Mix(nn.Module):
    """A token mixer; ``fault`` plants one numerical failure in its own forward code."""

    def __init__(self, d: int, fault: str | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.fault = fault
        if fault is not None:
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.bias.fill_(12.0 if fault == "exp" else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.fault == "log":
            return torch.log(h.relu())  # log(0) = -inf
        if self.fault == "exp":
            return torch.exp(h)  # exp(12) = 162755 > 65504: inf in float16
        if self.fault == "variance":
            variance = h.var(dim=-1, keepdim=True)  # h is constant: variance 0
            return (h - h.mean(dim=-1, keepdim=True)) / variance  # 0 / 0
        if self.fault == "sqrt":
            # sqrt(0) = 0 is fine; its derivative 1 / (2 sqrt(0)) is not.
            return x * torch.sqrt(h.square().sum(dim=-1, keepdim=True))
        return torch.tanh(h)


class Block(nn.Module):
    def __init__(self, d: int, fault: str | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Mix(d, fault)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.ff(x)


class Encoder(nn.Module):
    def __init__(self, d: int, fault: str | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d, fault), Block(d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Net(nn.Module):
    def __init__(self, fault: str | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.encoder = Encoder(D, fault)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def make(fault: str | None, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net(fault).to(dtype)


def batch(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).to(dtype)


def training_step(model: Net, x: torch.Tensor) -> torch.Tensor:
    loss = model(x).float().square().mean()
    loss.backward()
    return loss


def monitored_events(fault: str | None, x: torch.Tensor | None = None, dtype=torch.float32):
    model = make(fault, dtype)
    x = batch(dtype) if x is None else x
    with Monitor(model) as monitor:
        monitor.step(training_step(model, x))
        return monitor.events


UPSTREAM = ("embed", "encoder.layers.0", "encoder.layers.1.norm", "encoder.layers.1.attn.proj")
ENCLOSING = ("", "encoder", "encoder.layers.1")


@pytest.mark.parametrize(
    ("fault", "dtype"),
    [("log", torch.float32), ("exp", torch.float16), ("variance", torch.float32)],
)
def test_forward_fault_is_blamed_on_the_module_that_made_it(fault, dtype):
    events = monitored_events(fault, dtype=dtype)
    assert [(e.phase, e.origin, e.origin_type) for e in events] == [("forward", FAULTY, "Mix")]


@pytest.mark.parametrize(
    ("fault", "dtype"),
    [("log", torch.float32), ("exp", torch.float16), ("variance", torch.float32)],
)
def test_forward_fault_downstream_modules_are_listed_as_propagating(fault, dtype):
    (event,) = monitored_events(fault, dtype=dtype)
    assert {"encoder.layers.2", "encoder.layers.2.norm", "head"} <= set(event.propagated)
    assert not set(event.propagated) & set(UPSTREAM + ENCLOSING + (FAULTY,))


def test_forward_event_records_finite_inputs_and_non_finite_outputs():
    (event,) = monitored_events("log")
    assert [s.nonfinite for s in event.inputs] == [0]
    (output,) = event.outputs  # made by code in Mix.forward, not a leaf: only flagged
    assert (output.numel, output.nonfinite, output.min) == (6 * D, -1, None)


def test_backward_fault_is_blamed_on_the_module_whose_derivative_is_infinite():
    events = monitored_events("sqrt")
    assert [(e.phase, e.origin) for e in events] == [("backward", FAULTY)]
    (event,) = events
    assert "encoder.layers.1.attn.proj" in event.propagated  # received NaN, passed it on
    assert "encoder.layers.0" in event.propagated
    assert not set(event.propagated) & {"head", "encoder.layers.2", FAULTY, *ENCLOSING}
    assert {"encoder.layers.1.attn.proj.weight", "embed.weight"} <= set(event.parameters)
    assert "head.weight" not in event.parameters


def test_nan_in_the_input_batch_is_a_data_problem():
    x = batch()
    x[2, 1] = float("nan")
    events = monitored_events(None, x)
    assert [e.phase for e in events] == ["input"]
    (event,) = events
    assert event.inputs[0].nonfinite == 1
    assert "embed" in event.propagated and "head" in event.propagated


def test_a_non_finite_loss_from_finite_outputs_is_blamed_on_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.0, 2000.0]))
    with Monitor(model) as monitor:
        probabilities = torch.softmax(model(torch.ones(4, 3)), dim=-1)  # [0, 1]: underflow
        loss = -torch.log(probabilities[:, 0]).mean()  # log(0)
        loss.backward()
        monitor.step(loss)
        events = monitor.events
    assert [(e.phase, e.origin, e.origin_type) for e in events] == [("forward", "<loss>", "loss")]


def test_a_non_finite_gradient_made_by_the_loss_is_blamed_on_the_loss():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    with Monitor(model) as monitor:
        loss = torch.sqrt(model(torch.ones(4, 3)).square().sum())  # d sqrt(0) = inf
        loss.backward()
        monitor.step(loss)
        events = monitor.events
    assert [(e.phase, e.origin) for e in events] == [("backward", "<loss>")]
    assert events[0].propagated == ("0",)


def test_no_false_alarm_over_300_healthy_steps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 1), nn.Sigmoid(),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    with Monitor(model, optimizer, precision="float16") as monitor:
        for _ in range(300):
            x = torch.randn(32, 6, generator=generator)
            target = (x.sum(dim=1, keepdim=True) > 0).float()
            loss = nn.functional.binary_cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(loss)
        history = monitor.history
        assert monitor.events == []
    assert len(history.steps) == 300
    assert (history.modules["nonfinite"] == 0).all()
    assert (history.steps["nonfinite_grads"] == 0).all()


def test_raise_stops_before_the_optimizer_changes_the_weights():
    model = make("log")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with Monitor(model, optimizer, on_nonfinite="raise") as monitor:
        training_step(model, batch())
        with pytest.raises(FloatingPointError, match=re.escape(FAULTY)) as info:
            optimizer.step()
        assert monitor.current_step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert [e.origin for e in info.value.events] == [FAULTY]


def test_raise_without_optimizer_raises_from_monitor_step():
    model = make("variance")
    with Monitor(model, on_nonfinite="raise") as monitor:
        loss = training_step(model, batch())
        with pytest.raises(FloatingPointError, match="forward pass"):
            monitor.step(loss)


def test_warn_warns_at_the_sync_that_finds_the_event():
    model = make("log")
    with Monitor(model, on_nonfinite="warn", sync_every=1) as monitor:
        loss = training_step(model, batch())
        with pytest.warns(RuntimeWarning, match=re.escape(FAULTY)):
            monitor.step(loss)


def test_an_additive_minus_inf_attention_mask_is_not_a_non_finite_input():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    assert torch.isinf(mask).any()
    with Monitor(layer) as monitor:
        loss = layer(torch.randn(2, 5, 8), src_mask=mask).square().mean()
        loss.backward()
        monitor.step(loss)
        assert monitor.events == []


# ---------------------------------------------------------------------------- locate


def test_locate_names_the_forward_op_module_and_source_line():
    model = make("log")
    location = locate(training_step, model, batch())
    assert (location.op, location.module, location.phase) == (
        "aten.log.default",
        FAULTY,
        "forward",
    )
    assert location.source.startswith(__file__) and "torch.log" in location.code


@pytest.mark.parametrize(
    ("fault", "dtype", "op"),
    [("exp", torch.float16, "aten.exp.default"), ("variance", torch.float32, "aten.div.Tensor")],
)
def test_locate_names_the_op_of_each_forward_fault(fault, dtype, op):
    location = locate(training_step, make(fault, dtype), batch(dtype))
    assert (location.op, location.module, location.phase) == (op, FAULTY, "forward")


def test_locate_names_a_backward_op_where_its_forward_call_was_written():
    location = locate(training_step, make("sqrt"), batch())
    assert (location.op, location.module, location.phase) == (
        "aten.div.Tensor",
        FAULTY,
        "backward",
    )
    assert "torch.sqrt" in location.code


def test_locate_finds_nothing_when_the_nan_came_with_the_data():
    x = batch()
    x[0, 0] = float("nan")
    assert locate(training_step, make(None), x) is None


def test_locate_finds_nothing_in_a_healthy_step():
    assert locate(training_step, make(None), batch()) is None


def test_locate_stops_the_closure_at_the_faulty_op():
    model = make("log")
    reached = []

    def step(x):
        training_step(model, x)
        reached.append(True)

    assert locate(step, batch()) is not None
    assert reached == []


def test_locate_rejects_what_is_not_callable():
    with pytest.raises(TypeError, match="fn must be callable"):
        locate(3)


def test_events_survive_a_round_trip_through_dicts():
    (event,) = monitored_events("log")
    assert NonfiniteEvent.from_dict(event.to_dict()) == event
