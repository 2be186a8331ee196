"""Monitor lifecycle: step counting, host syncs, history files, hooks, state and bad input."""

from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from finite.monitor import History, Monitor
from finite.scaling import LossScaler

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def forward_backward(model, seed=0):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    loss = model(x).square().mean()
    loss.backward()
    return loss


# ---------------------------------------------------------------------------- steps


def test_the_optimizer_step_hook_ends_steps_when_step_is_never_called():
    model, optimizer = tiny()
    with Monitor(model, optimizer) as monitor:
        for i in range(4):
            forward_backward(model, i)
            optimizer.step()
            optimizer.zero_grad()
        assert monitor.current_step == 4
        assert monitor.history.steps["step"].tolist() == [0, 1, 2, 3]


def test_step_right_after_the_optimizer_attaches_the_loss_to_that_step():
    model, optimizer = tiny()
    losses = []
    with Monitor(model, optimizer) as monitor:
        for i in range(4):
            loss = forward_backward(model, i)
            optimizer.step()
            optimizer.zero_grad()
            assert monitor.step(loss) == i
            losses.append(loss.item())
        steps = monitor.history.steps
    assert steps["step"].tolist() == [0, 1, 2, 3]
    assert steps["loss"].tolist() == pytest.approx(losses, rel=0, abs=0)


def test_step_without_an_optimizer_ends_one_step_per_call():
    model, _ = tiny()
    with Monitor(model) as monitor:
        for i in range(3):
            assert monitor.step(forward_backward(model, i)) == i
        assert len(monitor.history.steps) == 3


def test_a_step_skipped_by_the_loss_scaler_is_marked_skipped():
    model, optimizer = tiny()
    scaler = LossScaler(init_scale=2.0**4)
    with Monitor(model, optimizer, scaler=scaler) as monitor:
        for poison in (False, True, False):
            loss = model(torch.randn(5, 3)).square().mean() * (math.inf if poison else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            monitor.step(loss)
        steps = monitor.history.steps
    assert steps["skipped"].tolist() == [False, True, False]
    assert steps["nonfinite_grads"].tolist() == [0, 4, 0]
    assert steps["loss_scale"].tolist() == [16.0, 16.0, 8.0]


def test_a_skipped_step_is_ended_by_the_next_forward_pass_when_step_is_not_called():
    model, optimizer = tiny()
    scaler = LossScaler(init_scale=2.0**4)
    with Monitor(model, optimizer, scaler=scaler) as monitor:
        for poison in (True, False):
            loss = model(torch.randn(5, 3)).square().mean() * (math.nan if poison else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        steps = monitor.history.steps
    assert steps["skipped"].tolist() == [True, False]


def test_every_takes_statistics_on_every_nth_step_only():
    model, optimizer = tiny()
    with Monitor(model, optimizer, every=2) as monitor:
        for i in range(5):
            forward_backward(model, i)
            optimizer.step()
            optimizer.zero_grad()
        history = monitor.history
    assert history.steps["measured"].tolist() == [True, False, True, False, True]
    assert sorted(set(history.modules["step"].tolist())) == [0, 2, 4]
    assert sorted(set(history.params["step"].tolist())) == [0, 2, 4]
    assert np.isfinite(history.steps["grad_norm"]).all()  # every step


def test_validation_under_no_grad_is_not_monitored():
    model, _ = tiny()
    with Monitor(model) as monitor:
        with torch.no_grad():
            model(torch.randn(2, 3))
        monitor.step(forward_backward(model))
        assert monitor.history.modules.where(module="0")["calls"].tolist() == [1]


def test_activation_checkpointing_recomputation_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    head = nn.Linear(4, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = inner, head

        def forward(self, x):
            return self.head(checkpoint(self.inner, x, use_reentrant=False))

    model = Net()
    with Monitor(model) as monitor:
        monitor.step(forward_backward(model))
        modules = monitor.history.modules
        assert monitor.events == []
    assert modules["module"].tolist() == ["inner.0", "inner.1", "head"]
    assert modules["calls"].tolist() == [1, 1, 1]


def test_an_exception_in_forward_leaves_the_monitor_usable():
    class Failing(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(3, 3), Failing())
    with Monitor(model) as monitor:
        with pytest.raises(ValueError, match="boom"):
            model(torch.randn(2, 3))
        loss = model[0](torch.randn(2, 3)).sum()
        loss.backward()
        monitor.step(loss)
        assert monitor.events == []
        assert monitor.history.modules["calls"].tolist() == [2]


# ---------------------------------------------------------------------------- syncs


class HostReads:
    """Counts reads of device values made from inside finite.monitor."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        package = os.sep + os.path.join("finite", "monitor") + os.sep
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(tensor, *args, _original=original, **kwargs):
                if package in sys._getframe(1).f_code.co_filename:
                    self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("sync_every", [1, 4, 10])
def test_the_host_reads_device_values_once_every_sync_every_steps(monkeypatch, sync_every):
    model, optimizer = tiny()
    monitor = Monitor(model, optimizer, sync_every=sync_every, histograms_every=3)
    reads = HostReads(monkeypatch)
    for i in range(20):
        loss = forward_backward(model, i)
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(loss)
    assert reads.count == 20 // sync_every
    monitor.close()
    assert reads.count == math.ceil(20 / sync_every)


def test_reading_history_syncs_what_is_pending():
    model, optimizer = tiny()
    with Monitor(model, optimizer, sync_every=100) as monitor:
        for i in range(3):
            forward_backward(model, i)
            optimizer.step()
        assert len(monitor.history.steps) == 3


def test_events_of_a_step_in_progress_are_visible_and_reported_once():
    model, _ = tiny()
    with torch.no_grad():
        model[0].bias.fill_(math.inf)
    with Monitor(model, sync_every=100) as monitor:
        loss = forward_backward(model)
        assert [e.origin for e in monitor.events] == ["0"]
        monitor.step(loss)
        assert [e.origin for e in monitor.events] == ["0"]


@pytest.mark.cuda
def test_no_cuda_synchronisation_between_syncs():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, optimizer, sync_every=1000, histograms_every=1) as monitor:
        for _ in range(2):  # warm up allocations and hooks
            model(torch.randn(5, 3, device="cuda")).square().mean().backward()
            optimizer.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                loss = model(torch.randn(5, 3, device="cuda")).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                monitor.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------- lifecycle


def test_close_removes_every_hook():
    model, optimizer = tiny()
    counts = (
        [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()],
        len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks),
    )
    monitor = Monitor(model, optimizer)
    forward_backward(model)
    optimizer.step()
    monitor.close()
    after = (
        [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()],
        len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks),
    )
    assert after == counts


def test_the_context_manager_closes_and_ends_the_step_in_progress():
    model, _ = tiny()
    with Monitor(model) as monitor:
        forward_backward(model)
    assert len(monitor.history.steps) == 1
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step()


def test_state_dict_resumes_the_step_count_and_appends_to_the_log(tmp_path):
    model, optimizer = tiny()
    with Monitor(model, optimizer, log_dir=tmp_path) as monitor:
        for i in range(3):
            forward_backward(model, i)
            optimizer.step()
        state = monitor.state_dict()
    assert state["step"] == 3
    with Monitor(model, optimizer, log_dir=tmp_path) as resumed:
        resumed.load_state_dict(state)
        for i in range(2):
            forward_backward(model, i)
            optimizer.step()
    history = History.from_jsonl(tmp_path / "history.jsonl")
    assert history.steps["step"].tolist() == [0, 1, 2, 3, 4]


def test_load_state_dict_rejects_a_bad_step():
    model, _ = tiny()
    with Monitor(model) as monitor:
        with pytest.raises(ValueError, match="step"):
            monitor.load_state_dict({"step": -1})


# ---------------------------------------------------------------------------- history


def run_logged(tmp_path, steps=4, **kwargs):
    model, optimizer = tiny()
    with Monitor(model, optimizer, log_dir=tmp_path, histograms_every=2, **kwargs) as monitor:
        for i in range(steps):
            loss = forward_backward(model, i)
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(loss)
        return monitor.history


def assert_tables_equal(a, b):
    assert a.columns == b.columns
    for name in a.columns:
        x, y = a[name], b[name]
        if x.dtype == object:
            assert x.tolist() == y.tolist(), name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_history_jsonl_reads_back_into_the_same_history(tmp_path):
    history = run_logged(tmp_path)
    loaded = History.from_jsonl(tmp_path / "history.jsonl")
    assert loaded.format == history.format and loaded.bins == history.bins
    for table in ("steps", "modules", "params", "histograms"):
        assert_tables_equal(getattr(loaded, table), getattr(history, table))


def test_history_jsonl_lines_are_json_objects_with_a_kind(tmp_path):
    run_logged(tmp_path)
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds == ["header"] + ["step"] * 4


def test_a_truncated_last_line_is_ignored(tmp_path):
    run_logged(tmp_path)
    path = tmp_path / "history.jsonl"
    path.write_text(path.read_text()[:-20])
    assert len(History.from_jsonl(path).steps) == 3


def test_to_jsonl_writes_what_from_jsonl_reads(tmp_path):
    history = run_logged(tmp_path / "run")
    history.to_jsonl(tmp_path / "copy.jsonl")
    loaded = History.from_jsonl(tmp_path / "copy.jsonl")
    for table in ("steps", "modules", "params", "histograms"):
        assert_tables_equal(getattr(loaded, table), getattr(history, table))


def test_series_and_where_select_one_parameter(tmp_path):
    history = run_logged(tmp_path)
    steps, values = history.series("grad_norm", "0.weight")
    rows = history.params.where(param="0.weight")
    assert steps.tolist() == [0, 1, 2, 3]
    assert values.tolist() == rows["grad_norm"].tolist()
    assert history.series("loss")[1].tolist() == history.steps["loss"].tolist()


def test_history_concat_keeps_rows_of_every_rank():
    a, b = History("float16"), History("float16")
    a.extend([{"step": 0, "rank": 0, "loss": 1.0}])
    b.extend([{"step": 0, "rank": 1, "loss": 2.0}])
    joined = History.concat([a, b])
    assert joined.steps["rank"].tolist() == [0, 1]
    assert joined.steps["loss"].tolist() == [1.0, 2.0]


def test_tensorboard_gets_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    run_logged(tmp_path, tensorboard=True)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be >= 1, got 0"),
        ({"sync_every": 2.5}, TypeError, "sync_every must be an int"),
        ({"histograms_every": -1}, ValueError, "histograms_every must be >= 0"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite must be one of"),
        ({"precision": "fp8"}, ValueError, "fp8"),
        ({"scaler": object()}, TypeError, "scaler must be"),
        ({"tensorboard": True}, ValueError, "needs a log_dir"),
        ({"log_dir": 3}, TypeError, "log_dir must be a path"),
    ],
)
def test_bad_arguments_are_rejected_with_their_name(kwargs, error, match):
    model, _ = tiny()
    with pytest.raises(error, match=match):
        Monitor(model, **kwargs)


def test_model_and_optimizer_types_are_checked():
    model, _ = tiny()
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module")):
        Monitor(lambda x: x)
    with pytest.raises(TypeError, match="optimizer must be"):
        Monitor(model, "sgd")


def test_step_rejects_a_loss_that_is_not_a_scalar():
    model, _ = tiny()
    with Monitor(model) as monitor:
        with pytest.raises(ValueError, match="loss must hold one value"):
            monitor.step(torch.ones(2))
        with pytest.raises(TypeError, match="loss must be a tensor"):
            monitor.step("0.5")


def test_an_optimizer_over_master_weights_is_monitored_without_update_statistics():
    import finite

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model.to(torch.bfloat16)
    master = finite.MasterWeights(model.parameters())
    optimizer = torch.optim.SGD(master.parameters(), lr=0.1)
    with finite.Monitor(model, optimizer, sync_every=1) as monitor:
        for _ in range(3):
            loss = model(torch.randn(16, 4, dtype=torch.bfloat16)).float().square().mean()
            loss.backward()
            master.accumulate_grads_()
            optimizer.step()
            master.copy_to_model_()
            master.zero_grad()
            monitor.step(loss)
        steps = monitor.history.steps
    assert list(steps["step"]) == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(steps["loss"])))


class _AutocastInside(nn.Module):
    """Turns autocast on inside its own forward, as accelerate's wrapped forward does."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.layer(x)


def test_format_follows_autocast_turned_on_inside_the_models_forward():
    model = _AutocastInside()
    with Monitor(model, sync_every=1) as monitor:
        model(torch.randn(2, 4)).float().sum().backward()
        monitor.step()
        assert monitor.format.name == "bfloat16"


def test_explicit_precision_is_kept_under_autocast_inside_the_forward():
    model = _AutocastInside()
    with Monitor(model, precision="float16", sync_every=1) as monitor:
        model(torch.randn(2, 4)).float().sum().backward()
        monitor.step()
        assert monitor.format.name == "float16"


def test_close_rejects_an_end_step_that_is_not_a_bool():
    monitor = Monitor(nn.Linear(2, 1))
    with pytest.raises(TypeError, match="end_step must be a bool, got str"):
        monitor.close(end_step="no")
    monitor.close()


def test_close_without_ending_drops_the_step_in_progress():
    model = nn.Linear(2, 1)
    monitor = Monitor(model, sync_every=1)
    model(torch.randn(3, 2)).sum().backward()
    monitor.step()
    model(torch.randn(3, 2)).sum().backward()  # a second step, never ended
    monitor.close(end_step=False)
    assert monitor.history.steps["step"].tolist() == [0]
