"""Global hooks that find a script's models, optimizers and losses without changing it.

What is hooked, while :class:`Instrumentation` is installed:

* ``torch.optim.Optimizer.__init__`` and ``finite.LossScaler.__init__``: every optimizer
  and loss scaler the script builds is remembered (weakly), so a model found later is
  monitored with the optimizer that holds its parameters.
* a global module forward pre/post hook: a module with parameters called while no
  other module is running (with gradients enabled) is a *root*, a top-level model; the
  first call of each root attaches a :class:`finite.Monitor` to it. The Monitor then
  hooks the model's own modules; the global hooks only discover.
* ``torch.Tensor.backward``: a one-element tensor whose backward is called is taken as
  the loss (divided back by a ``torch.amp.GradScaler`` or ``finite.LossScaler`` scale
  when it came from their ``scale``), kept on the device.
* global optimizer step post hook: after each ``optimizer.step()``, the loss is attached
  to each monitor of that optimizer (``monitor.step(loss)``), and ``max_steps`` is
  enforced by raising :class:`StopRun`.

:meth:`Instrumentation.remove` undoes all of it.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as optimizer_hooks

from finite.monitor import Monitor
from finite.scaling import LossScaler

__all__ = ["Instrumentation", "StopRun"]


class StopRun(Exception):
    """Raised from an optimizer step hook once ``max_steps`` steps have run."""


class Instrumentation:
    """Install the doctor's global hooks; one :class:`Monitor` per model found.

    Parameters
    ----------
    monitor_kwargs : dict
        Passed to every :class:`Monitor` (``precision``, ``sync_every``, ``on_nonfinite``).
    max_steps : int, optional
        Raise :class:`StopRun` after this many optimizer steps.
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
        self._depth = 0
        self._loss: torch.Tensor | None = None
        self._scaled: dict[int, torch.Tensor] = {}  # id(scaled loss) -> unscaled loss
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
        self._patch(LossScaler, "__init__", self._wrap_init(self._scalers))
        self._patch(LossScaler, "scale", self._wrap_scale)
        self._patch(torch.amp.GradScaler, "scale", self._wrap_scale)
        self._patch(torch.Tensor, "backward", self._wrap_backward)
        self.installed = True
        return self

    def remove(self) -> None:
        """Remove every hook and wrapper (monitors stay open: see :meth:`close_monitors`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()
        self.installed = False

    def close_monitors(self) -> None:
        for monitor in self.monitors:
            monitor.close()

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

    def _wrap_backward(self, original: Any) -> Any:
        doctor = self

        @functools.wraps(original)
        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.numel() == 1 and tensor.is_floating_point():
                unscaled = doctor._scaled.pop(id(tensor), None)
                doctor._loss = (unscaled if unscaled is not None else tensor).detach().reshape(())
            return original(tensor, *args, **kwargs)

        return backward

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, module: nn.Module, args: tuple) -> None:
        root = self._depth == 0
        self._depth += 1
        if not root or id(module) in self._owned or not torch.is_grad_enabled():
            return
        params = {id(p) for p in module.parameters()}
        if not params:
            return  # a loss module or a parameter-free function called at the top level
        before = set(module._forward_pre_hooks)
        monitor = Monitor(
            module, self._optimizer_for(params), scaler=self._scaler(), **self.monitor_kwargs
        )
        self.monitors.append(monitor)
        self._owned.update(id(m) for m in module.modules())
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
        self.optimizer_steps += 1
        loss, self._loss = self._loss, None
        owned = [m for m in self.monitors if m.optimizer is optimizer]
        if not owned:
            # An optimizer over copies of the weights (master weights) or built after
            # the model ran: the monitors without an optimizer end their step here.
            owned = [m for m in self.monitors if m.optimizer is None]
        for monitor in owned:
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

    def _scaler(self) -> LossScaler | None:
        scalers = [s for s in (ref() for ref in self._scalers) if s is not None]
        return scalers[0] if len(scalers) == 1 else None
