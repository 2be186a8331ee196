"""The health monitor: per-layer numerics every step, and where inf/NaN came from."""

from __future__ import annotations

import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from finite.formats import FloatFormat, get_format
from finite.monitor.events import LOSS_ORIGIN, NonfiniteEvent, TensorSummary
from finite.monitor.histograms import HistogramBins, log2_histogram
from finite.monitor.history import History
from finite.monitor.provenance import Call, backward_origin, forward_origin
from finite.monitor.stats import (
    Scratch,
    UnderflowThresholds,
    count_nonfinite,
    count_totals,
    flag_sum,
    gradient_norms,
    gradient_stats,
    leaf_stats,
    snapshot,
    summarize,
    unit_dim,
    update_stats,
)
from finite.monitor.writers import JsonlWriter, TensorBoardWriter, jsonl_path

__all__ = ["Monitor"]

_ON_NONFINITE = ("record", "warn", "raise")
_CHANNELS_FIRST = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
)
# Leaf modules whose output is their input, masked or rescaled: no activation statistics
# (their outputs are still checked for inf/NaN).
_PASSTHROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)
_HINT = (
    "To name the operation, re-run the failing step under "
    "finite.locate(step_fn, batch): it returns the aten op, module and source line."
)


def _activation_kind(module: nn.Module) -> str | None:
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return "relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    return None


def _collect(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, out)


def _floating_inputs(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Floating-point tensors among a call's arguments.

    Keyword arguments whose name contains ``mask`` are left out: additive attention masks
    hold ``-inf`` on purpose.
    """
    out: list[torch.Tensor] = []
    _collect(args, out)
    for name, value in kwargs.items():
        if "mask" not in name.lower():
            _collect(value, out)
    return out


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.coalesce().values() if grad.is_sparse else grad


def _is_grad_scaler(scaler: object) -> bool:
    """Whether ``scaler`` is a ``torch.amp.GradScaler`` (``torch.cuda.amp``'s included)."""
    return isinstance(scaler, torch.amp.GradScaler)


def _scale_tensor(scaler: object) -> torch.Tensor | None:
    """The scaler's current loss scale as a device tensor (no host read), or None."""
    if _is_grad_scaler(scaler):
        # GradScaler keeps its scale in ``_scale``: a 0-d device tensor created by the
        # first ``scale()`` call; there is none while the scaler is disabled.
        if not scaler.is_enabled():  # type: ignore[attr-defined]
            return None
        scale = getattr(scaler, "_scale", None)
    else:
        scale = getattr(scaler, "scale_tensor", None)
    return scale if isinstance(scale, torch.Tensor) else None


@dataclass
class _Slot:
    numel: int
    producer: int | None  # module index of the call that returned it
    ranged: bool  # stats are [min, max]; else [sum, sum], a flag


class _Entry(NamedTuple):
    ref: weakref.ReferenceType
    version: int | None
    slot: int


class _Trace:
    """What one step recorded: host bookkeeping and device tensors not yet read."""

    def __init__(self, step: int, measured: bool, histograms: bool, skipped_before: int | None):
        self.step = step
        self.measured = measured
        self.histograms = histograms
        self.skipped_before = skipped_before
        self.skipped = False
        self.activity = False
        self.backward_ran = False
        self.slots: list[_Slot] = []
        self.slot_stats: list[torch.Tensor] = []
        self.calls: list[Call] = []
        self.root_inputs: list[int] = []
        self.root_outputs: list[int] = []
        self.root_module = 0
        self.input_counts: list[tuple[int, torch.Tensor]] = []
        self.leaf: list[tuple[int, torch.Tensor, int]] = []  # (call, stats, units)
        self.grads: list[tuple[int, torch.Tensor]] = []  # (slot, [sum]), arrival order
        self.grad_params: list[int] = []
        self.grad_table: torch.Tensor | None = None  # [norm] or [norm, min, max] per param
        self.grad_counts: torch.Tensor | None = None  # measured steps: element counts
        self.hist_params: list[int] = []
        self.hist_table: torch.Tensor | None = None
        self.update_params: list[int] = []
        self.update_table: torch.Tensor | None = None
        self.loss: torch.Tensor | float | None = None
        self.scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None  # GradScaler: > 0 when it skipped the step
        self.reported: set[tuple[str, str]] = set()


class _Pack:
    """Device tensors gathered into one buffer for a single read to the host."""

    def __init__(self) -> None:
        self._floats: list[torch.Tensor] = []
        self._ints: list[torch.Tensor] = []
        self._sizes = [0, 0]
        self.values: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, tensor: torch.Tensor | None) -> tuple[int, int, int, tuple[int, ...]] | None:
        if tensor is None:
            return None
        group = 1 if tensor.dtype == torch.int64 else 0
        flat = tensor.reshape(-1)
        start = self._sizes[group]
        self._sizes[group] += flat.numel()
        (self._ints if group else self._floats).append(flat)
        return group, start, self._sizes[group], tuple(tensor.shape)

    def read(self) -> None:
        parts = [p for p in (self._floats, self._ints) if p]
        if not parts:
            self.values = (np.empty(0), np.empty(0))
            return
        device = parts[0][0].device
        joined = [torch.cat([t.to(device) for t in p]).to(torch.float64) for p in parts]
        # The one host read of a sync.
        flat = torch.cat(joined).cpu().numpy()
        n = self._sizes[0]
        self.values = (flat[:n], flat[n:])

    def get(self, handle: tuple[int, int, int, tuple[int, ...]] | None) -> np.ndarray | None:
        if handle is None or self.values is None:
            return None
        group, start, stop, shape = handle
        return self.values[group][start:stop].reshape(shape)


class _GradHook:
    """Tensor hook recording a slot's gradient; holds no reference to the tensor."""

    __slots__ = ("index", "monitor", "trace")

    def __init__(self, monitor: Monitor, trace: _Trace, index: int) -> None:
        self.monitor = monitor
        self.trace = trace
        self.index = index

    def __call__(self, grad: torch.Tensor) -> None:
        self.monitor._on_slot_grad(self.trace, self.index, grad)


class Monitor:
    """Watch a model's numerics every step; name the module where inf/NaN first appears.

    Algorithm (all numbers stay on the device until a sync)::

        forward hooks, every module call (grad enabled):
            every distinct floating-point input/output tensor: min, max, non-finite count
            leaf modules, measured steps (step % every == 0): sum of squares; dead units
                (ReLU/ReLU6); saturated outputs (Sigmoid/Tanh)
            outputs that require grad: a tensor hook summarises their gradient
        end of each backward (autograd callback):
            all parameter gradients: L2 norm (one torch._foreach_norm); measured steps
            also absmax, non-finite count and how many would underflow/turn subnormal
            in `precision`; every `histograms_every` steps log2 histograms of weights
            and gradients
        optimizer.step, measured steps (step pre/post hooks):
            |w_before|, |w_after|, |w_after - w_before|
        step end (optimizer step hook, or monitor.step()):
            every `sync_every` steps: one read of everything to the host -> History,
            NonfiniteEvents, history.jsonl, TensorBoard

    **Steps.** ``monitor.step(loss)`` ends a step: call it once per iteration after
    ``optimizer.step()``. When ``optimizer`` is given, its step hook ends the step
    anyway, and a ``monitor.step(loss)`` right after it only attaches the loss to that
    step, so a step is never counted twice. When a ``scaler`` skipped the optimizer step
    and ``monitor.step`` is not called, the next forward pass ends it (with a
    ``finite.LossScaler``; a ``torch.amp.GradScaler`` does not count its skipped steps, so
    with one, call ``monitor.step(loss)`` every iteration after ``scaler.step(optimizer)``).
    Without optimizer or calls to ``monitor.step`` everything is one step. Forward passes
    under ``torch.no_grad()``/``inference_mode`` (validation) are not monitored.

    **Provenance.** See :mod:`finite.monitor.provenance`: the forward origin is the first
    module (in the order modules finish) whose inputs are all finite and whose output is
    not; the backward origin the first whose incoming gradient is finite and outgoing
    one is not; a non-finite model input is a data problem (phase ``"input"``); a
    non-finite loss from finite model outputs is blamed on ``"<loss>"``. Backward events
    are reported only for steps whose forward pass was clean.

    **Host synchronisation.** None on the per-step path with ``on_nonfinite="record"``
    or ``"warn"``: one read every ``sync_every`` steps, and when :attr:`history`,
    :attr:`events`, :meth:`gather`, :meth:`close` or ``state_dict`` is used.
    ``on_nonfinite="raise"`` reads one flag per step to raise before ``optimizer.step()``
    changes the weights.

    Parameters
    ----------
    model : torch.nn.Module
        The model; hooks go on every module (``named_modules()``) and parameter.
    optimizer : torch.optim.Optimizer, optional
        Enables update statistics and ends steps on ``optimizer.step()``.
    scaler : LossScaler or torch.amp.GradScaler, optional
        Loss scaler (``finite.LossScaler``, anything with ``scale_tensor`` and
        ``skipped_steps``, or a ``torch.amp.GradScaler``): gradient norms are reported
        unscaled, underflow is measured on the scaled gradient as stored, the loss scale
        is recorded and skipped steps are marked. A GradScaler's skip is read from its
        found-inf flags (device tensors, read at the next sync) when the step ends inside
        ``scaler.step(optimizer)``; a step that ``monitor.step()`` ends after a backward
        pass without ``optimizer.step()`` is one it skipped.
    precision : str, torch.dtype or FloatFormat, optional
        Format the statistics are measured against (``"float16"``, ``"bfloat16"``,
        ``"float8_e4m3fn"``...). None: the autocast dtype if autocast is on at the first
        forward pass, else the narrowest floating dtype among the parameters.
    every : int, default 1
        Take activation, gradient and update statistics every ``every`` steps (non-finite
        detection runs every step).
    sync_every : int, default 10
        Steps between reads of the device statistics.
    histograms_every : int, default 100
        Steps between weight/gradient histograms; 0 disables them.
    on_nonfinite : {"record", "warn", "raise"}, default "record"
        ``"warn"`` warns at the sync that finds an event; ``"raise"`` raises
        ``FloatingPointError`` (with the events in ``.events``) at the end of the step:
        from ``optimizer.step()`` before the weights change, or from ``monitor.step()``.
    log_dir : str or PathLike, optional
        Directory for ``history.jsonl`` (``history.rank{r}.jsonl`` on other ranks) and
        TensorBoard files.
    tensorboard : bool, default False
        Also write to TensorBoard (needs the ``tensorboard`` package and ``log_dir``).

    Raises
    ------
    TypeError, ValueError
        For an argument of the wrong type or out of range.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with Monitor(model, optimizer, precision="float16") as monitor:
    ...     for _ in range(3):
    ...         loss = model(torch.randn(16, 4)).square().mean()
    ...         loss.backward()
    ...         optimizer.step()
    ...         optimizer.zero_grad()
    ...         _ = monitor.step(loss)
    ...     history = monitor.history
    >>> len(history.steps), monitor.events
    (3, [])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: Any = None,
        precision: str | torch.dtype | FloatFormat | None = None,
        every: int = 1,
        sync_every: int = 10,
        histograms_every: int = 100,
        on_nonfinite: str = "record",
        log_dir: str | os.PathLike[str] | None = None,
        tensorboard: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        if scaler is not None and not (hasattr(scaler, "scale_tensor") or _is_grad_scaler(scaler)):
            raise TypeError(
                "scaler must be a finite.LossScaler (with scale_tensor) or a "
                f"torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        for name, value, lowest in (
            ("every", every, 1),
            ("sync_every", sync_every, 1),
            ("histograms_every", histograms_every, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {value}")
        if on_nonfinite not in _ON_NONFINITE:
            options = ", ".join(repr(o) for o in _ON_NONFINITE)
            raise ValueError(f"on_nonfinite must be one of {options}; got {on_nonfinite!r}")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
        if not isinstance(tensorboard, bool):
            raise TypeError(f"tensorboard must be a bool, got {type(tensorboard).__name__}")
        if tensorboard and log_dir is None:
            raise ValueError("tensorboard=True needs a log_dir")

        self._model = model
        self._optimizer = optimizer
        self._scaler = scaler
        self._every = every
        self._sync_every = sync_every
        self._histograms_every = histograms_every
        self._on_nonfinite = on_nonfinite
        self._log_dir = log_dir
        self._rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

        self._module_list = list(model.named_modules())
        self._paths = [path for path, _ in self._module_list]
        self._index = {id(module): i for i, (_, module) in enumerate(self._module_list)}
        self._types = [type(module).__name__ for _, module in self._module_list]
        self._is_leaf = [
            next(module.children(), None) is None and not isinstance(module, _PASSTHROUGH)
            for _, module in self._module_list
        ]
        self._kinds = [_activation_kind(module) for _, module in self._module_list]
        self._channels_first = [isinstance(m, _CHANNELS_FIRST) for _, m in self._module_list]
        self._depth = [0 if not path else path.count(".") + 1 for path in self._paths]
        self._params: list[tuple[str, nn.Parameter]] = list(model.named_parameters())
        self._param_index = {id(p): i for i, (_, p) in enumerate(self._params)}
        self._param_numel = [p.numel() for _, p in self._params]
        owners = {
            id(p): self._index[id(module)]
            for _, module in self._module_list
            for p in module.parameters(recurse=False)
        }
        self._param_owner = [owners.get(id(p), 0) for _, p in self._params]

        self._format: FloatFormat | None = None
        self._bins: HistogramBins | None = None
        self._thresholds: dict[torch.dtype, UnderflowThresholds] = {}
        self._history = History()
        # Without a precision, autocast turned on inside the model's forward (as
        # accelerate does) is looked for until the first step ends.
        self._autocast_pending = precision is None
        if precision is not None:
            self._set_format(get_format(precision))
        self._tensorboard = (
            TensorBoardWriter(log_dir) if tensorboard and log_dir is not None else None
        )
        self._jsonl: JsonlWriter | None = None
        self._resumed = False

        self._step = 0
        self._trace = self._new_trace()
        self._pending: list[_Trace] = []
        self._auto_closed: _Trace | None = None
        self._registry: dict[int, _Entry] = {}
        self._stack: list[tuple[int, tuple[int, ...]]] = []
        self._backward_end_queued = False
        self._snapshot: list[torch.Tensor] | None = None
        self._before_norms: list[torch.Tensor] = []
        self._scratch = Scratch()
        # Non-finite elements are counted once any were seen (or always when raising):
        # until then the flags say they are 0, and the counting passes are skipped.
        self._counting = on_nonfinite == "raise"
        self._closed = False

        self._handles: list[Any] = []
        for _, module in self._module_list:
            self._handles.append(
                module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            )
            self._handles.append(
                module.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True)
            )
        for _, p in self._params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_param_grad))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_optimizer_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_optimizer_step))

    # ------------------------------------------------------------------ public API
    @property
    def history(self) -> History:
        """Everything synced so far (reading it syncs pending steps first)."""
        self._sync(include_open=True)
        return self._history

    @property
    def events(self) -> list[NonfiniteEvent]:
        """The non-finite events so far (reading them syncs pending steps first)."""
        self._sync(include_open=True)
        return list(self._history.events)

    @property
    def model(self) -> torch.nn.Module:
        """The model being watched."""
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose steps end the monitor's steps, if one was given."""
        return self._optimizer

    @property
    def scaler(self) -> Any:
        """The loss scaler whose scale the statistics are corrected for, if one was given."""
        return self._scaler

    @property
    def format(self) -> FloatFormat | None:
        """The format statistics are measured against; None until the first forward pass
        when ``precision`` was not given."""
        return self._format

    @property
    def current_step(self) -> int:
        """Index of the step being recorded (the number of steps ended so far)."""
        return self._step

    @property
    def rank(self) -> int:
        return self._rank

    def step(self, loss: torch.Tensor | float | None = None) -> int:
        """End the current step (or attach ``loss`` to the one ``optimizer.step()`` ended).

        Parameters
        ----------
        loss : 0-d tensor or float, optional
            The step's loss; kept on the device until the next sync.

        Returns
        -------
        int
            Index of the step the call ended or attached the loss to.
        """
        self._check_open()
        value = self._loss_value(loss)
        if self._auto_closed is not None and not self._trace.activity:
            trace = self._auto_closed
            if value is not None:
                trace.loss = value
            self._auto_closed = None
            self._maybe_sync()
            return trace.step
        trace = self._trace
        if value is not None:
            trace.loss = value
        if (
            self._optimizer is not None
            and trace.backward_ran
            and not (_is_grad_scaler(self._scaler) and self._found_inf() is not None)
        ):
            # optimizer.step() would have ended this step through its hook: a step ended
            # here after a backward pass was skipped (by a GradScaler, whose found-inf
            # flags update() has reset, by StableStep, or by a script that stopped before
            # stepping). A GradScaler's flags still set decide at the next sync instead.
            trace.skipped = True
        if self._on_nonfinite == "raise":
            self._raise_if_nonfinite()
        self._end_step(by_optimizer=False)
        return trace.step

    def gather(self, dst: int = 0, group: Any = None) -> History | None:
        """Collect every rank's history on rank ``dst`` (a collective: call on all ranks).

        Returns the combined :class:`History` (rows of every rank, told apart by the
        ``rank`` column) on ``dst`` and None elsewhere; the plain history without an
        initialised process group.
        """
        self._sync(include_open=True)
        if not (dist.is_available() and dist.is_initialized()):
            return self._history
        payload = {
            "format": self._history.format,
            "bins": self._bins.to_dict() if self._bins is not None else None,
            "records": self._history.records(),
            "events": [event.to_dict() for event in self._history.events],
        }
        rank = dist.get_rank(group)
        gathered: list[Any] | None = [None] * dist.get_world_size(group) if rank == dst else None
        dist.gather_object(payload, gathered, dst=dst, group=group)
        if gathered is None:
            return None
        histories = []
        for part in gathered:
            bins = HistogramBins.from_dict(part["bins"]) if part["bins"] else None
            history = History(part["format"], bins)
            history.extend(part["records"], [NonfiniteEvent.from_dict(e) for e in part["events"]])
            histories.append(history)
        return History.concat(histories)

    def close(self, *, end_step: bool = True) -> None:
        """End a step in progress, sync, remove every hook and close the files.

        Parameters
        ----------
        end_step : bool, default True
            Record a step in progress (a forward or backward pass since the last step) as
            a last step. False drops it: a model that also ran in another model's step
            (a GAN's critic in the generator's step) has no step of its own there.
        """
        if not isinstance(end_step, bool):
            raise TypeError(f"end_step must be a bool, got {type(end_step).__name__}")
        if self._closed:
            return
        if self._trace.activity and end_step:
            self._end_step(by_optimizer=False)
        self._sync()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The counters needed to resume: the step index and the format."""
        return {
            "version": 1,
            "step": self._step,
            "format": self._format.name if self._format is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume counting at the saved step; ``history.jsonl`` is appended to.

        Raises
        ------
        ValueError
            If a step is in progress or ``state_dict`` lacks ``"step"``.
        """
        if "step" not in state_dict:
            raise ValueError(f"state_dict has no 'step' (keys: {sorted(state_dict)})")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict['step'] must be a non-negative int, got {step!r}")
        if self._trace.activity or self._pending:
            raise ValueError("load_state_dict must be called before the first step")
        self._step = step
        self._trace = self._new_trace()
        if self._format is None and state_dict.get("format"):
            self._set_format(get_format(state_dict["format"]))
            self._autocast_pending = False  # the saved run's format stands
        self._resumed = True

    # ------------------------------------------------------------------ steps
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the monitor is closed")

    def _new_trace(self) -> _Trace:
        step = self._step
        skipped = getattr(self._scaler, "skipped_steps", None)
        return _Trace(
            step,
            measured=step % self._every == 0,
            histograms=self._histograms_every > 0 and step % self._histograms_every == 0,
            skipped_before=skipped if isinstance(skipped, int) else None,
        )

    def _loss_value(self, loss: object) -> torch.Tensor | float | None:
        if loss is None:
            return None
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must hold one value, got shape {tuple(loss.shape)}")
            return loss.detach().reshape(()).to(torch.float32, copy=True)
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return float(loss)
        raise TypeError(f"loss must be a tensor, a float or None, got {type(loss).__name__}")

    def _note_activity(self) -> None:
        if self._auto_closed is not None:
            self._auto_closed = None
            self._maybe_sync()  # deferred so that a loss could still be attached
        self._trace.activity = True

    def _found_inf(self) -> torch.Tensor | None:
        """A GradScaler's found-inf flags for this step, summed on the device; None when
        it has none (not a GradScaler, not unscaled yet, or reset by ``update()``)."""
        if not _is_grad_scaler(self._scaler):
            return None
        states = getattr(self._scaler, "_per_optimizer_states", None)
        if not states:
            return None
        if self._optimizer is not None:
            # .get: the states are a defaultdict, and indexing would add an entry.
            state = states.get(id(self._optimizer))
            chosen = [state] if state else []
        else:
            chosen = list(states.values())
        flags = [
            flag
            for state in chosen
            for flag in state.get("found_inf_per_device", {}).values()
            if isinstance(flag, torch.Tensor)
        ]
        if not flags:
            return None
        device = flags[0].device
        return torch.stack([f.detach().to(device, torch.float32).reshape(()) for f in flags]).sum()

    def _end_step(self, by_optimizer: bool) -> None:
        self._autocast_pending = False
        trace = self._trace
        skipped = getattr(self._scaler, "skipped_steps", None)
        if trace.skipped_before is not None and isinstance(skipped, int):
            trace.skipped = skipped > trace.skipped_before
        if trace.found_inf is None:
            trace.found_inf = self._found_inf()
        self._pending.append(trace)
        self._step += 1
        self._trace = self._new_trace()
        self._registry.clear()
        self._stack.clear()
        self._snapshot = None
        self._auto_closed = trace if by_optimizer else None
        if not by_optimizer:
            self._maybe_sync()

    def _maybe_sync(self) -> None:
        if len(self._pending) >= self._sync_every:
            self._sync()

    def _nonfinite_flag(self, trace: _Trace) -> torch.Tensor | None:
        summaries = trace.slot_stats + [g for _, g in trace.grads]
        flags = []
        if summaries:
            flags.append(~torch.cat(summaries).isfinite().all())
        if trace.grad_table is not None:
            flags.append(~trace.grad_table[:, 0].isfinite().all())
        if isinstance(trace.loss, torch.Tensor):
            flags.append(~trace.loss.isfinite())
        if not flags:
            return None
        return torch.stack(flags).any()

    def _raise_if_nonfinite(self) -> None:
        trace = self._trace
        loss_bad = isinstance(trace.loss, float) and not math.isfinite(trace.loss)
        flag = self._nonfinite_flag(trace)
        # The one read per step of on_nonfinite="raise".
        if not loss_bad and (flag is None or not bool(flag)):
            return
        skipped = getattr(self._scaler, "skipped_steps", None)
        if trace.skipped_before is not None and isinstance(skipped, int):
            trace.skipped = trace.skipped or skipped > trace.skipped_before
        found_inf = self._found_inf()
        if trace.skipped or (found_inf is not None and bool(found_inf > 0)):
            return  # the scaler skips this step: the overflow does not reach the weights
        self._end_step(by_optimizer=False)
        self._sync()
        events = [e for e in self._history.events if e.step == trace.step]
        message = "\n".join(str(e) for e in events) or f"step {trace.step}: non-finite values"
        error = FloatingPointError(message)
        error.events = events  # type: ignore[attr-defined]
        raise error

    # ------------------------------------------------------------------ format
    def _set_format(self, fmt: FloatFormat) -> None:
        self._format = fmt
        self._bins = HistogramBins.for_format(fmt)
        self._thresholds = {
            dtype: UnderflowThresholds(fmt, dtype) for dtype in (torch.float32, torch.float64)
        }
        self._history = History(fmt.name, self._bins)

    def _autocast_dtype(self, inputs: list[torch.Tensor]) -> torch.dtype | None:
        """The autocast dtype of the parameters' (or inputs') device, if autocast is on."""
        params = [p for _, p in self._params if p.is_floating_point()]
        device = params[0].device if params else inputs[0].device if inputs else None
        device_type = device.type if device is not None else "cpu"
        try:
            if torch.is_autocast_enabled(device_type):
                return torch.get_autocast_dtype(device_type)
        except (TypeError, RuntimeError):  # device types without autocast
            pass
        return None

    def _adopt_autocast(self) -> None:
        """Measure against the autocast dtype when the model turned autocast on inside
        its own forward, after the root's call chose the parameters' dtype."""
        dtype = self._autocast_dtype([])
        if dtype is None or self._format is None:
            return
        self._autocast_pending = False
        try:
            fmt = get_format(dtype)
        except ValueError:
            return
        if fmt.name != self._format.name:
            self._set_format(fmt)

    def _resolve_format(self, inputs: list[torch.Tensor]) -> None:
        params = [p for _, p in self._params if p.is_floating_point()]
        dtype = self._autocast_dtype(inputs)
        if dtype is not None:
            self._autocast_pending = False
        else:
            dtypes = {p.dtype for p in params} or {torch.float32}
            dtype = min(dtypes, key=lambda d: (torch.finfo(d).bits, torch.finfo(d).max))
        try:
            fmt = get_format(dtype)
        except ValueError:
            fmt = get_format("float32")
        self._set_format(fmt)

    # ------------------------------------------------------------------ forward hooks
    def _slot(self, tensor: torch.Tensor, producer: int | None, ranged: bool = False) -> int:
        """The slot of ``tensor``: summarised once per version, its gradient hooked.

        ``ranged`` slots (the model's inputs, measured leaf outputs) get ``[min, max]``
        from one ``aminmax``; the others only a non-finite flag from one ``sum``.
        """
        trace = self._trace
        key = id(tensor)
        version = None if tensor.is_inference() else tensor._version
        entry = self._registry.get(key)
        if entry is not None and entry.version == version and entry.ref() is tensor:
            slot = trace.slots[entry.slot]
            if ranged and not slot.ranged:
                trace.slot_stats[entry.slot] = summarize(tensor)
                slot.ranged = True
            return entry.slot
        index = len(trace.slots)
        trace.slots.append(_Slot(tensor.numel(), producer, ranged))
        trace.slot_stats.append(summarize(tensor) if ranged else flag_sum(tensor).expand(2))
        if version is not None:
            self._registry[key] = _Entry(weakref.ref(tensor), version, index)
        if tensor.requires_grad:
            tensor.register_hook(_GradHook(self, trace, index))
        return index

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._closed or not torch.is_grad_enabled():
            return
        if not self._stack and torch._C._current_autograd_node() is not None:
            return  # activation checkpointing recomputes inside backward: seen already
        index = self._index.get(id(module))
        if index is None:
            return
        inputs = _floating_inputs(args, kwargs)
        root = not self._stack
        if root:
            self._forward_started(inputs)
        elif self._autocast_pending:
            self._adopt_autocast()
        slots = tuple(dict.fromkeys(self._slot(t, None, ranged=root) for t in inputs))
        if root:
            trace = self._trace
            trace.root_inputs.extend(slots)
            trace.root_module = index
            # Data problems are reported with counts: one more kernel pair per input.
            for t in inputs:
                slot = self._slot(t, None, ranged=True)
                trace.input_counts.append((slot, count_nonfinite(t.detach(), self._scratch)))
        self._stack.append((index, slots))

    def _forward_started(self, inputs: list[torch.Tensor]) -> None:
        trace = self._trace
        skipped = getattr(self._scaler, "skipped_steps", None)
        if (
            trace.backward_ran
            and trace.skipped_before is not None
            and isinstance(skipped, int)
            and skipped > trace.skipped_before
        ):
            self._end_step(by_optimizer=False)  # the scaler skipped optimizer.step()
        self._note_activity()
        self._registry.clear()
        if self._format is None:
            self._resolve_format(inputs)

    def _post_forward(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self._stack or not torch.is_grad_enabled():
            return
        index, in_slots = self._stack[-1]
        if index != self._index.get(id(module)):
            return
        self._stack.pop()
        trace = self._trace
        outputs: list[torch.Tensor] = []
        _collect(output, outputs)
        ranged = trace.measured and self._is_leaf[index]
        out_slots = tuple(dict.fromkeys(self._slot(t, index, ranged) for t in outputs))
        trace.calls.append(Call(index, in_slots, out_slots))
        if trace.measured and self._is_leaf[index] and outputs:
            self._leaf_stats(trace, index, in_slots, outputs)
        if not self._stack:
            trace.root_outputs.extend(out_slots)

    def _leaf_stats(
        self, trace: _Trace, index: int, in_slots: tuple[int, ...], outputs: list[torch.Tensor]
    ) -> None:
        kind = self._kinds[index]
        first = outputs[0]
        producers = (trace.slots[s].producer for s in in_slots)
        channels_first = any(p is not None and self._channels_first[p] for p in producers)
        stats = leaf_stats(first, kind, channels_first, self._scratch, count=self._counting)
        if len(outputs) > 1:
            rest = sum(
                torch.linalg.vector_norm(t.detach(), dtype=torch.float32).square()
                for t in outputs[1:]
            )
            stats = torch.cat((stats[:1] + rest, stats[1:]))
        units = 0
        if kind == "relu" and first.dim() > 0:
            units = first.shape[unit_dim(first, channels_first)]
        trace.leaf.append((len(trace.calls) - 1, stats, units))

    # ------------------------------------------------------------------ backward hooks
    def _on_slot_grad(self, trace: _Trace, index: int, grad: torch.Tensor) -> None:
        if trace is not self._trace or self._closed:
            return  # a graph built in an earlier step
        trace.grads.append((index, flag_sum(grad)))
        self._queue_backward_end()

    def _on_param_grad(self, param: torch.Tensor) -> None:
        if not self._closed:
            self._queue_backward_end()

    def _queue_backward_end(self) -> None:
        if not self._backward_end_queued:
            self._backward_end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        self._backward_end_queued = False
        if self._closed:
            return
        self._note_activity()
        trace = self._trace
        trace.backward_ran = True
        if self._format is None:
            self._resolve_format([])
        indices = [i for i, (_, p) in enumerate(self._params) if p.grad is not None]
        grads = [_dense(self._params[i][1].grad) for i in indices]  # type: ignore[arg-type]
        if grads:
            if trace.measured:
                trace.grad_table, trace.grad_counts = gradient_stats(
                    grads, self._thresholds, self._scratch, count_finite=self._counting
                )
            else:
                trace.grad_table = torch.stack(gradient_norms(grads)).unsqueeze(1)
            trace.grad_params = indices
            if trace.histograms and self._bins is not None:
                bins = self._bins
                trace.hist_table = torch.stack(
                    [
                        torch.stack(
                            (log2_histogram(self._params[i][1], bins), log2_histogram(g, bins))
                        )
                        for i, g in zip(indices, grads, strict=True)
                    ]
                )
                trace.hist_params = indices
        scale = _scale_tensor(self._scaler)
        if scale is not None:
            trace.scale = scale.detach().to(torch.float32, copy=True)

    # ------------------------------------------------------------------ optimizer hooks
    def _optimizer_params(self) -> list[int]:
        assert self._optimizer is not None
        ids = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
        return [i for i, (_, p) in enumerate(self._params) if id(p) in ids]

    def _pre_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        if self._on_nonfinite == "raise":
            self._raise_if_nonfinite()
        trace = self._trace
        trace.activity = True
        indices = self._optimizer_params() if trace.measured else []
        # An optimizer over copies of the weights (finite.MasterWeights) holds none of the
        # model's parameters: there is no update of the model's weights to measure here.
        if indices:
            params = [self._params[i][1].detach() for i in indices]
            trace.update_params = indices
            self._before_norms = gradient_norms(params)
            self._snapshot = snapshot(params)

    def _post_optimizer_step(
        self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
    ) -> None:
        if self._closed:
            return
        trace = self._trace
        if self._snapshot is not None:
            params = [self._params[i][1] for i in trace.update_params]
            update_norms = update_stats(self._snapshot, params)
            trace.update_table = torch.stack(
                (torch.stack(self._before_norms), torch.stack(update_norms)), dim=1
            )
            self._snapshot = None
        self._end_step(by_optimizer=True)

    # ------------------------------------------------------------------ sync
    def _sync(self, include_open: bool = False) -> None:
        traces = list(self._pending)
        open_trace = self._trace if include_open and self._trace.activity else None
        if not traces and open_trace is None:
            return
        pack = _Pack()
        everything = traces + ([open_trace] if open_trace is not None else [])
        handles = [self._pack(trace, pack) for trace in everything]
        pack.read()
        records, events = [], []
        for trace, handle in zip(everything, handles, strict=True):
            record, found = self._read(trace, handle, pack)
            events.extend(found)
            if trace is not open_trace:
                records.append(record)
        del self._pending[: len(traces)]
        self._history.extend(records, events)
        self._write(records, events)
        if self._on_nonfinite == "warn":
            for event in events:
                warnings.warn(f"finite.Monitor: {event}", RuntimeWarning, stacklevel=3)

    def _write(self, records: list[dict[str, Any]], events: list[NonfiniteEvent]) -> None:
        if self._log_dir is None:
            return
        if self._jsonl is None:
            self._jsonl = JsonlWriter(
                jsonl_path(self._log_dir, self._rank),
                self._history.header(self._rank),
                append=self._resumed,
            )
        self._jsonl.write(records, events)
        if self._tensorboard is not None:
            self._tensorboard.write(records, self._bins)

    def _pack(self, trace: _Trace, pack: _Pack) -> dict[str, Any]:
        loss = trace.loss if isinstance(trace.loss, torch.Tensor) else None
        return {
            "slots": pack.add(torch.stack(trace.slot_stats) if trace.slot_stats else None),
            "leaf": [pack.add(stats) for _, stats, _ in trace.leaf],
            "grads": pack.add(torch.stack([s for _, s in trace.grads]) if trace.grads else None),
            "grad_table": pack.add(trace.grad_table),
            "grad_counts": pack.add(trace.grad_counts),
            "hist": pack.add(trace.hist_table),
            "update": pack.add(trace.update_table),
            "input_counts": pack.add(
                torch.stack([c for _, c in trace.input_counts]) if trace.input_counts else None
            ),
            "loss": pack.add(loss.reshape(1) if loss is not None else None),
            "scale": pack.add(trace.scale.reshape(1) if trace.scale is not None else None),
            "found_inf": pack.add(
                trace.found_inf.reshape(1) if trace.found_inf is not None else None
            ),
        }

    def _read(
        self, trace: _Trace, handle: dict[str, Any], pack: _Pack
    ) -> tuple[dict[str, Any], list[NonfiniteEvent]]:
        slots = pack.get(handle["slots"])
        if slots is None:
            slots = np.zeros((0, 2))
        loss = pack.get(handle["loss"])
        loss_value = float(loss[0]) if loss is not None else trace.loss
        assert not isinstance(loss_value, torch.Tensor)
        scale = pack.get(handle["scale"])
        scale_value = float(scale[0]) if scale is not None else None
        divisor = scale_value if scale_value and math.isfinite(scale_value) else 1.0
        found_inf = pack.get(handle["found_inf"])
        grad_table = pack.get(handle["grad_table"])
        leaf: list[np.ndarray] = [pack.get(h) for h in handle["leaf"]]  # type: ignore[misc]
        grad_counts = pack.get(handle["grad_counts"])
        if grad_counts is not None and grad_table is not None:
            numel = np.array([self._param_numel[i] for i in trace.grad_params])
            finite = np.isfinite(grad_table[:, 1:]).all(axis=1)
            grad_counts = count_totals(grad_counts, numel, finite)

        record: dict[str, Any] = {
            "kind": "step",
            "step": trace.step,
            "rank": self._rank,
            "loss": loss_value,
            "loss_scale": scale_value,
            "skipped": trace.skipped or bool(found_inf is not None and found_inf[0] > 0),
            "measured": trace.measured,
            "grad_norm": None,
            "nonfinite_grads": None,
            "modules": {},
            "params": {},
            "histograms": {},
        }
        params_bad = [False] * len(self._params)
        if grad_table is not None:
            norms = grad_table[:, 0]
            record["grad_norm"] = float(np.sqrt(np.sum(norms.astype(np.float64) ** 2))) / divisor
            bad = ~np.isfinite(norms)
            if grad_counts is not None:
                bad |= ~(grad_counts[:, 4] == 0)
            record["nonfinite_grads"] = int(bad.sum())
            for i, b in zip(trace.grad_params, bad, strict=True):
                params_bad[i] = bool(b)
        if trace.measured:
            record["modules"] = self._module_records(trace, slots, leaf)
            record["params"] = self._param_records(
                trace, grad_table, grad_counts, pack.get(handle["update"]), divisor
            )
        hist = pack.get(handle["hist"])
        if hist is not None:
            for i, counts in zip(trace.hist_params, hist, strict=True):
                record["histograms"][self._params[i][0]] = {
                    "weight": counts[0].astype(np.int64).tolist(),
                    "grad": counts[1].astype(np.int64).tolist(),
                }
        counted = {}
        if leaf:
            for (call_index, _, _), row in zip(trace.leaf, leaf, strict=True):
                outputs = trace.calls[call_index].outputs
                if len(outputs) == 1 and row[1] >= 0:
                    counted[outputs[0]] = int(row[1])
        input_counts = pack.get(handle["input_counts"])
        if input_counts is not None:
            for (slot, _), count in zip(trace.input_counts, input_counts, strict=True):
                counted[slot] = int(count)
        events = self._events(
            trace, slots, pack.get(handle["grads"]), params_bad, loss_value, counted
        )
        if events or any(params_bad):
            self._counting = True  # count non-finite elements from now on
        return record, events

    def _module_records(
        self, trace: _Trace, slots: np.ndarray, leaf: list[np.ndarray]
    ) -> dict[str, dict[str, Any]]:
        if not leaf:
            return {}
        assert self._format is not None
        log2_max = math.log2(self._format.max)
        totals: dict[int, dict[str, Any]] = {}
        extremes = slots.tolist()  # plain floats: faster than numpy on a few values
        for (call_index, _, units), array in zip(trace.leaf, leaf, strict=True):
            row = array.tolist()
            sumsq, nonfinite = row[0], row[1]
            kind = self._kinds[trace.calls[call_index].module]
            extra = row[2] if len(row) > 2 else math.nan
            dead = extra if kind == "relu" else math.nan
            saturated = extra if kind in ("sigmoid", "tanh") else math.nan
            call = trace.calls[call_index]
            out = list(call.outputs)
            total = totals.setdefault(
                call.module,
                {
                    "calls": 0,
                    "numel": 0,
                    "absmax": 0.0,
                    "sumsq": 0.0,
                    "nonfinite": 0,
                    "dead": [],
                    "saturated": 0.0,
                    "saturation_numel": 0,
                },
            )
            total["calls"] += 1
            total["numel"] += sum(trace.slots[s].numel for s in out)
            bounds = [extremes[s] for s in out]
            finite = all(math.isfinite(v) for pair in bounds for v in pair)
            if finite:
                absmax = max((max(-low, high) for low, high in bounds), default=0.0)
            elif any(math.isnan(v) for pair in bounds for v in pair):
                absmax = math.nan
            else:
                absmax = math.inf
            if not math.isnan(total["absmax"]):
                total["absmax"] = max(total["absmax"], absmax) if not math.isnan(absmax) else absmax
            total["sumsq"] += float(sumsq)
            if finite:
                pass  # every output element finite: nothing to count
            elif nonfinite >= 0 and total["nonfinite"] >= 0:
                total["nonfinite"] += int(nonfinite)
            else:
                total["nonfinite"] = -1  # some, not counted
            if units:
                total["dead"].append(float(dead) / units)
            if not math.isnan(saturated):
                total["saturated"] += float(saturated)
                total["saturation_numel"] += trace.slots[out[0]].numel
        records = {}
        for module, total in totals.items():
            absmax, numel = total["absmax"], total["numel"]
            if math.isnan(absmax):
                headroom = math.nan
            elif absmax == 0:
                headroom = math.inf
            else:
                headroom = log2_max - math.log2(absmax)
            kind = self._kinds[module]
            records[self._paths[module]] = {
                "type": self._types[module],
                "calls": total["calls"],
                "numel": numel,
                "absmax": absmax,
                "rms": math.sqrt(total["sumsq"] / numel) if numel else math.nan,
                "nonfinite": total["nonfinite"],
                "headroom_bits": headroom,
                "dead_fraction": float(np.mean(total["dead"])) if total["dead"] else math.nan,
                "saturated_fraction": (
                    total["saturated"] / total["saturation_numel"]
                    if kind in ("sigmoid", "tanh") and total["saturation_numel"]
                    else math.nan
                ),
            }
        return records

    def _param_records(
        self,
        trace: _Trace,
        grad_table: np.ndarray | None,
        grad_counts: np.ndarray | None,
        update: np.ndarray | None,
        divisor: float,
    ) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}

        def row(i: int) -> dict[str, Any]:
            name = self._params[i][0]
            return records.setdefault(
                name,
                {
                    "numel": self._param_numel[i],
                    "grad_norm": math.nan,
                    "grad_absmax": math.nan,
                    "grad_nonfinite": -1,
                    "grad_underflow_fraction": math.nan,
                    "grad_subnormal_fraction": math.nan,
                    "weight_norm": math.nan,
                    "update_norm": math.nan,
                    "update_ratio": math.nan,
                },
            )

        if grad_table is not None and grad_counts is not None:
            for i, (norm, low, high), (_, underflow, subnormal, normal, nonfinite) in zip(
                trace.grad_params, grad_table.tolist(), grad_counts.tolist(), strict=True
            ):
                absmax = (
                    math.nan if math.isnan(low) or math.isnan(high) else max(abs(low), abs(high))
                )
                finite_nonzero = underflow + subnormal + normal
                r = row(i)
                r["grad_norm"] = float(norm) / divisor
                r["grad_absmax"] = float(absmax) / divisor
                r["grad_nonfinite"] = int(nonfinite) if not math.isnan(nonfinite) else -1
                r["grad_underflow_fraction"] = (
                    float(underflow / finite_nonzero) if finite_nonzero else 0.0
                )
                r["grad_subnormal_fraction"] = (
                    float(subnormal / finite_nonzero) if finite_nonzero else 0.0
                )
        if update is not None:
            for i, (before, delta) in zip(trace.update_params, update.tolist(), strict=True):
                r = row(i)
                r["weight_norm"] = float(before)
                r["update_norm"] = float(delta)
                r["update_ratio"] = float(delta) / float(before) if before > 0 else math.nan
        return records

    # ------------------------------------------------------------------ events
    def _summaries(
        self,
        stats: np.ndarray,
        slots: tuple[int, ...],
        trace: _Trace,
        counted: dict[int, int] | None = None,
    ) -> tuple[TensorSummary, ...]:
        """Summaries of forward slots (rows ``[min, max]``)."""
        out = []
        for s in slots:
            low, high = float(stats[s][0]), float(stats[s][1])
            if (math.isfinite(low) and math.isfinite(high)) or trace.slots[s].numel == 0:
                nonfinite = 0
            else:  # counted for the model's inputs and measured leaf outputs only
                nonfinite = (counted or {}).get(s, -1)
            if not trace.slots[s].ranged:
                low = high = None  # type: ignore[assignment]
            out.append(TensorSummary(trace.slots[s].numel, nonfinite, low, high))
        return tuple(out)

    def _grad_summaries(
        self, bad: dict[int, bool], slots: tuple[int, ...], trace: _Trace
    ) -> tuple[TensorSummary, ...]:
        """Summaries of slot gradients: only a flag was taken (-1: some non-finite)."""
        return tuple(
            TensorSummary(trace.slots[s].numel, -1 if bad[s] else 0, None, None)
            for s in slots
            if s in bad
        )

    def _propagated(self, calls: list[Call], indices: tuple[int, ...]) -> tuple[str, ...]:
        # The model itself (path "") is left out: every propagation passes through it.
        paths = (self._paths[calls[i].module] for i in indices)
        return tuple(dict.fromkeys(path for path in paths if path))

    def _events(
        self,
        trace: _Trace,
        slots: np.ndarray,
        grads: np.ndarray | None,
        params_bad: list[bool],
        loss: float | None,
        counted: dict[int, int],
    ) -> list[NonfiniteEvent]:
        events: list[NonfiniteEvent] = []
        if (
            (len(slots) == 0 or np.isfinite(slots).all())
            and (grads is None or np.isfinite(grads).all())
            and not any(params_bad)
            and (loss is None or math.isfinite(loss))
        ):
            return events  # a healthy step: the common case

        def add(phase: str, origin: str, origin_type: str, **fields: Any) -> None:
            if (phase, origin) in trace.reported:
                return
            trace.reported.add((phase, origin))
            events.append(
                NonfiniteEvent(
                    trace.step, phase, origin, origin_type, rank=self._rank, hint=_HINT, **fields
                )
            )

        empty = np.array([slot.numel == 0 for slot in trace.slots], dtype=bool)
        bad = ~np.isfinite(slots).all(axis=1) & ~empty if len(slots) else np.zeros(0, bool)
        calls = trace.calls
        forward = forward_origin(calls, bad)
        propagated = self._propagated(calls, forward.propagated)
        input_bad = any(bad[s] for s in trace.root_inputs)
        if input_bad:
            add(
                "input",
                self._paths[trace.root_module],
                "input",
                propagated=propagated,
                inputs=self._summaries(slots, tuple(trace.root_inputs), trace, counted),
                outputs=self._summaries(slots, tuple(trace.root_outputs), trace, counted),
            )
        if forward.call is not None:
            call = calls[forward.call]
            add(
                "forward",
                self._paths[call.module],
                self._types[call.module],
                propagated=propagated,
                inputs=self._summaries(slots, call.inputs, trace, counted),
                outputs=self._summaries(slots, call.outputs, trace, counted),
            )
        forward_clean = not bad.any()
        loss_bad = loss is not None and not math.isfinite(loss)
        if forward_clean and loss_bad:
            add(
                "forward",
                LOSS_ORIGIN,
                "loss",
                inputs=self._summaries(slots, tuple(trace.root_outputs), trace, counted),
                outputs=(TensorSummary(1, 1, loss, loss),),  # type: ignore[arg-type]
            )
        if not forward_clean or loss_bad:
            return events

        # Backward: only when the forward pass was clean (else it is a consequence).
        order: dict[int, int] = {}
        grad_bad: dict[int, bool] = {}
        if grads is not None:
            for position, ((slot, _), row) in enumerate(zip(trace.grads, grads, strict=True)):
                grad_bad[slot] = grad_bad.get(slot, False) or not np.isfinite(row).all()
                order.setdefault(slot, position)
        bad_params = tuple(self._params[i][0] for i, b in enumerate(params_bad) if b)
        if not any(grad_bad.values()) and not bad_params:
            return events
        module_params_bad = [False] * len(self._module_list)
        for i, b in enumerate(params_bad):
            if b:
                module_params_bad[self._param_owner[i]] = True
        backward = backward_origin(calls, grad_bad, order, module_params_bad, self._depth)
        propagated = self._propagated(calls, backward.propagated)
        if backward.call is not None:
            call = calls[backward.call]
            add(
                "backward",
                self._paths[call.module],
                self._types[call.module],
                propagated=propagated,
                inputs=self._grad_summaries(grad_bad, call.outputs, trace),
                outputs=self._grad_summaries(grad_bad, call.inputs, trace),
                parameters=bad_params,
            )
        elif any(grad_bad.get(s, False) for s in trace.root_outputs):
            add(
                "backward",
                LOSS_ORIGIN,
                "loss",
                propagated=propagated,
                inputs=(),
                outputs=self._grad_summaries(grad_bad, tuple(trace.root_outputs), trace),
                parameters=bad_params,
            )
        elif bad_params:
            owner = self._param_owner[self._param_index[id(dict(self._params)[bad_params[0]])]]
            add(
                "backward",
                self._paths[owner],
                self._types[owner],
                propagated=propagated,
                parameters=bad_params,
            )
        return events
