"""Global hooks that find a script's models, optimizers and losses without changing it.

What is hooked, while :class:`Instrumentation` is installed:

* ``torch.optim.Optimizer.__init__``, ``finite.LossScaler.__init__`` and
  ``torch.amp.GradScaler.__init__``: every optimizer and loss scaler the script builds is
  remembered (weakly), so a model found later is monitored with the optimizer that holds
  its parameters and the loss scaler.
* a global module forward pre/post hook: a module with parameters called while no
  other module is running (with gradients enabled) is a *root*, a top-level model; the
  first call of each root attaches a :class:`finite.Monitor` to it. The Monitor then
  hooks the model's own modules; the global hooks only discover.
* ``torch.Tensor.backward`` and ``torch.autograd.backward``: a one-element tensor whose
  backward is called is taken as the loss (divided back by a ``torch.amp.GradScaler`` or
  ``finite.LossScaler`` scale when it came from their ``scale``), kept on the device. The
  losses of several backward calls before one optimizer step (gradient accumulation) are
  summed: the gradient the optimizer applies is the gradient of that sum.
* global optimizer step post hook: after each ``optimizer.step()``, the loss is attached
  to each monitor of that optimizer (``monitor.step(loss)``), and ``max_steps`` is
  enforced by raising :class:`StopRun`.
* ``GradScaler.step`` and ``LossScaler.step``: a step they skip (inf/NaN gradients, so
  ``optimizer.step()`` never runs and its hook never fires) ends the monitors' step
  there, with its loss; the Monitor marks it skipped.
* ``torch.nn.utils.clip_grad_norm_``: the threshold and how often the norm exceeded it
  (counted on the device), per model, for the report.

:meth:`Instrumentation.remove` undoes all of it; :meth:`Instrumentation.finish` then
records a loss whose ``backward()`` ran without an optimizer step after it (the script
stopped on a NaN loss) as a last step.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import clip_grad
from torch.optim import optimizer as optimizer_hooks

from finite.monitor import Monitor
from finite.scaling import LossScaler

__all__ = ["ClipRecord", "Instrumentation", "StopRun"]


class StopRun(Exception):
    """Raised from an optimizer step hook once ``max_steps`` steps have run."""


@dataclass
class ClipRecord:
    """What ``clip_grad_norm_`` did to one model's gradients during the run.

    Attributes
    ----------
    max_norm : float
        The threshold of the last call.
    calls : int
        Number of calls.
    clipped : torch.Tensor
        Number of calls whose total norm exceeded ``max_norm`` (or was not finite), a
        device tensor: counting needs no host read.
    """

    max_norm: float
    calls: int
    clipped: torch.Tensor


def _enabled(scaler: Any) -> bool:
    if isinstance(scaler, torch.amp.GradScaler):
        return scaler.is_enabled()
    config = getattr(scaler, "config", None)
    return bool(getattr(config, "enabled", True))


class Instrumentation:
    """Install the doctor's global hooks; one :class:`Monitor` per model found.

    Parameters
    ----------
    monitor_kwargs : dict
        Passed to every :class:`Monitor` (``precision``, ``sync_every``, ``on_nonfinite``).
    max_steps : int, optional
        Raise :class:`StopRun` after this many steps (optimizer steps, and steps a loss
        scaler skipped).
    """

    def __init__(self, monitor_kwargs: dict[str, Any], max_steps: int | None = None) -> None:
        if max_steps is not None and (isinstance(max_steps, bool) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
        self.monitor_kwargs = dict(monitor_kwargs)
        self.max_steps = max_steps
        self.monitors: list[Monitor] = []
        self.optimizer_steps = 0
        self._optimizers: list[weakref.ReferenceType] = []
        self._scalers: list[weakref.ReferenceType] = []
        self._owned: set[int] = set()  # ids of every module inside a monitored model
        self._roots: dict[int, Monitor] = {}  # id(model) -> its monitor
        self._params: dict[int, Monitor] = {}  # id(parameter) -> its model's monitor
        self._depth = 0
        self._loss: torch.Tensor | None = None
        self._scaled: dict[int, torch.Tensor] = {}  # id(scaled loss) -> unscaled loss
        # Monitors whose model ran forward since their last step, and the step index each
        # was at when the last backward ran: a loss pending at the end belongs to those.
        self._ran: set[int] = set()
        self._backward_at: dict[int, int] = {}
        self._stepped: torch.optim.Optimizer | None = None
        self._in_backward = False
        self._clips: dict[int, ClipRecord] = {}  # id(monitor) -> its clipping
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, Any]] = []
        self.installed = False

    # ------------------------------------------------------------------ install/remove
    def install(self) -> Instrumentation:
        self._handles = [
            module_hooks.register_module_forward_pre_hook(self._pre_forward),
            module_hooks.register_module_forward_hook(self._post_forward, always_call=True),
            optimizer_hooks.register_optimizer_step_post_hook(self._post_step),
        ]
        self._patch(torch.optim.Optimizer, "__init__", self._wrap_init(self._optimizers))
        for scaler_type in (LossScaler, torch.amp.GradScaler):
            self._patch(scaler_type, "__init__", self._wrap_init(self._scalers))
            self._patch(scaler_type, "scale", self._wrap_scale)
            self._patch(scaler_type, "step", self._wrap_scaler_step)
        self._patch(torch.Tensor, "backward", self._wrap_backward)
        self._patch(torch.autograd, "backward", self._wrap_backward)
        original_clip = clip_grad.__dict__["clip_grad_norm_"]
        clip = self._wrap_clip(original_clip)
        for owner in (clip_grad, torch.nn.utils):
            if owner.__dict__.get("clip_grad_norm_") is original_clip:
                self._patch(owner, "clip_grad_norm_", lambda _original: clip)
        self.installed = True
        return self

    def remove(self) -> None:
        """Remove every hook and wrapper (monitors stay open: see :meth:`finish`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()
        self.installed = False

    def finish(self) -> None:
        """Record what the run left after its last step, then close every monitor.

        A loss whose ``backward()`` ran with no optimizer step after it (the script raised
        on a NaN loss before ``optimizer.step()``) ends the step of each monitor whose
        model ran in it, with that loss. Any other step in progress is recorded when it
        holds inf/NaN values, and dropped otherwise: a model that also ran in another
        model's last step (a GAN's critic in the generator's step) has no step of its own
        there.
        """
        loss, self._loss = self._loss, None
        for monitor in self.monitors:
            at = self._backward_at.get(id(monitor))
            try:
                if loss is not None and at is not None and monitor.current_step == at:
                    monitor.step(loss)
                    monitor.close()
                else:
                    step = monitor.current_step
                    found = any(e.step == step for e in monitor.events)  # syncs: run's end
                    monitor.close(end_step=found)
            except FloatingPointError:
                # on_nonfinite="raise" at this last step: it is recorded; close the rest.
                monitor.close()
        self._ran.clear()
        self._backward_at.clear()

    def close_monitors(self) -> None:
        for monitor in self.monitors:
            monitor.close()

    def clipping(self, monitor: Monitor) -> ClipRecord | None:
        """What ``clip_grad_norm_`` did to ``monitor``'s model, if the script clipped it."""
        return self._clips.get(id(monitor))

    def _patch(self, owner: Any, name: str, make: Any) -> None:
        original = owner.__dict__[name]
        self._patches.append((owner, name, original))
        setattr(owner, name, make(original))

    # ------------------------------------------------------------------ wrappers
    @staticmethod
    def _wrap_init(registry: list[weakref.ReferenceType]) -> Any:
        def make(original: Any) -> Any:
            @functools.wraps(original)
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                original(self, *args, **kwargs)
                if not any(ref() is self for ref in registry):
                    registry.append(weakref.ref(self))

            return __init__

        return make

    def _wrap_scale(self, original: Any) -> Any:
        doctor = self

        @functools.wraps(original)
        def scale(scaler: Any, outputs: Any, *args: Any, **kwargs: Any) -> Any:
            scaled = original(scaler, outputs, *args, **kwargs)
            if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
                doctor._scaled = {id(scaled): outputs.detach()}
            return scaled

        return scale

    def _wrap_scaler_step(self, original: Any) -> Any:
        doctor = self

        @functools.wraps(original)
        def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            doctor._stepped = None
            result = original(scaler, optimizer, *args, **kwargs)
            if doctor._stepped is not optimizer and isinstance(optimizer, torch.optim.Optimizer):
                # The scaler skipped optimizer.step() (inf/NaN gradients), so the step
                # hook did not end the step: end it here, while the scaler still holds
                # this step's found-inf flags (update() resets them).
                doctor._step_ended(optimizer)
            return result

        return step

    def _wrap_backward(self, original: Any) -> Any:
        doctor = self

        @functools.wraps(original)
        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if doctor._in_backward:  # Tensor.backward calls torch.autograd.backward
                return original(tensors, *args, **kwargs)
            if isinstance(tensors, (list, tuple)) and len(tensors) == 1:
                tensors = tensors[0]
            if isinstance(tensors, torch.Tensor):
                doctor._capture_loss(tensors)
            doctor._in_backward = True
            try:
                return original(tensors, *args, **kwargs)
            finally:
                doctor._in_backward = False

        return backward

    def _capture_loss(self, tensor: torch.Tensor) -> None:
        if tensor.numel() != 1 or not tensor.is_floating_point():
            return
        unscaled = self._scaled.pop(id(tensor), None)
        loss = (unscaled if unscaled is not None else tensor).detach().reshape(())
        # Several backward calls before one optimizer step accumulate their gradients:
        # the step's loss is the sum (one add on the device, no host read).
        self._loss = loss if self._loss is None else self._loss + loss
        for monitor in self.monitors:
            if id(monitor) in self._ran:
                self._backward_at[id(monitor)] = monitor.current_step

    def _wrap_clip(self, original: Any) -> Any:
        doctor = self

        @functools.wraps(original)
        def clip_grad_norm_(parameters: Any, max_norm: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            else:
                parameters = list(parameters)  # a generator is read once: keep it
            total = original(parameters, max_norm, *args, **kwargs)
            doctor._record_clip(parameters, max_norm, total)
            return total

        return clip_grad_norm_

    def _record_clip(self, parameters: list[torch.Tensor], max_norm: Any, total: Any) -> None:
        if not isinstance(total, torch.Tensor) or isinstance(max_norm, bool):
            return
        if isinstance(max_norm, torch.Tensor):
            if max_norm.numel() != 1:
                return
            threshold = float(max_norm.detach().cpu())
        elif isinstance(max_norm, (int, float)):
            threshold = float(max_norm)
        else:
            return
        monitors = {id(m): m for p in parameters if (m := self._params.get(id(p))) is not None}
        if not monitors and len(self.monitors) == 1:
            monitors = {id(self.monitors[0]): self.monitors[0]}  # clipping copies of weights
        # Not "total <= max_norm": a NaN norm counts as clipped, as it exceeds nothing.
        exceeded = (~(total.detach() <= threshold)).to(torch.int64).reshape(())
        for key in monitors:
            record = self._clips.get(key)
            if record is None or record.clipped.device != exceeded.device:
                self._clips[key] = ClipRecord(threshold, 1, exceeded.clone())
            else:
                record.max_norm = threshold
                record.calls += 1
                record.clipped += exceeded

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, module: nn.Module, args: tuple) -> None:
        root = self._depth == 0
        self._depth += 1
        if not root or not torch.is_grad_enabled():
            return
        known = self._roots.get(id(module))
        if known is not None:
            self._ran.add(id(known))
            return
        if id(module) in self._owned:
            return
        params = {id(p) for p in module.parameters()}
        if not params:
            return  # a loss module or a parameter-free function called at the top level
        before = set(module._forward_pre_hooks)
        monitor = Monitor(
            module, self._optimizer_for(params), scaler=self._scaler(), **self.monitor_kwargs
        )
        self.monitors.append(monitor)
        self._roots[id(module)] = monitor
        self._ran.add(id(monitor))
        self._owned.update(id(m) for m in module.modules())
        for p in module.parameters():
            self._params.setdefault(id(p), monitor)
        # torch collected this call's hooks before ours ran: run the Monitor's pre-hook on
        # the root by hand so that the first forward pass is monitored too (keyword
        # arguments are not passed to global hooks, so the Monitor sees positional ones).
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook_id not in before:
                if hook_id in module._forward_pre_hooks_with_kwargs:
                    hook(module, args, {})
                else:
                    hook(module, args)

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = optimizer
        self._step_ended(optimizer)

    def _step_ended(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer``'s step is over (taken or skipped): attach the loss, count it."""
        self.optimizer_steps += 1
        loss, self._loss = self._loss, None
        owned = [m for m in self.monitors if m.optimizer is optimizer]
        if not owned:
            # An optimizer over copies of the weights (master weights) or built after
            # the model ran: the monitors without an optimizer end their step here.
            owned = [m for m in self.monitors if m.optimizer is None]
        for monitor in owned:
            self._ran.discard(id(monitor))
            self._backward_at.pop(id(monitor), None)
            monitor.step(loss)
        if self.max_steps is not None and self.optimizer_steps >= self.max_steps:
            raise StopRun(f"stopped after {self.optimizer_steps} optimizer steps (--max-steps)")

    # ------------------------------------------------------------------ matching
    def _optimizer_for(self, params: set[int]) -> torch.optim.Optimizer | None:
        for ref in self._optimizers:
            optimizer = ref()
            if optimizer is None:
                continue
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if held & params:
                return optimizer
        return None

    def _scaler(self) -> Any:
        """The one enabled loss scaler the script built, if it built exactly one."""
        scalers = [s for s in (ref() for ref in self._scalers) if s is not None and _enabled(s)]
        return scalers[0] if len(scalers) == 1 else None
