"""Find the first operation that turned finite values into inf/NaN: :func:`locate`.

:func:`locate` re-runs a closure (typically one training step on the batch that failed)
under a ``TorchDispatchMode`` that checks every aten operation, forward and backward:
the first one whose floating-point inputs (tensors and Python scalars) are all finite
and whose output is not is reported with the module it ran in and the user's source
line. A ``TorchFunctionMode`` tags each autograd node with the module and source line
of the forward call that created it, so a backward operation is reported where its
forward counterpart was written (``sqrt`` at 0 is fine forward and infinite backward).

It checks and reads back every operation's values, so it is slow: a debugging tool for
one step, not for training.
"""

from __future__ import annotations

import linecache
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import finite

__all__ = ["OpLocation", "locate"]

_TAG = "finite.locate"
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(str(module.__file__))) + os.sep for module in (torch, finite)
)
# Operations whose output is uninitialised memory: not a numerical result.
_UNINITIALISED_PREFIXES = ("aten::empty", "aten::new_empty", "aten::resize", "aten::set_")


@dataclass(frozen=True)
class OpLocation:
    """The first aten operation that produced inf/NaN from finite inputs.

    Attributes
    ----------
    op : str
        The operation, e.g. ``"aten.div.Tensor"``.
    module : str or None
        Path (as in ``named_modules()``) of the innermost module whose forward ran the
        operation, or, in the backward pass, the one whose forward created it; ``""`` is
        the root module; None outside every module.
    source : str or None
        ``"file.py:line"`` of the user's code that called it (for a backward operation:
        the forward call it differentiates).
    phase : {"forward", "backward"}
    code : str or None
        The text of that source line.
    """

    op: str
    module: str | None
    source: str | None
    phase: str
    code: str | None = None

    def __str__(self) -> str:
        where = f" in module {self.module!r}" if self.module is not None else ""
        text = f"{self.op} ({self.phase}){where}"
        if self.source:
            text += f" at {self.source}"
            if self.code:
                text += f": {self.code}"
        return text


class _Found(Exception):
    """Stops the closure once the operation is found."""


def locate(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> OpLocation | None:
    """Run ``fn(*args, **kwargs)`` and name the first op that made inf/NaN from finite inputs.

    Parameters
    ----------
    fn : callable
        The computation to examine, e.g. a function doing forward and backward of one
        training step. It is stopped right after the offending operation, so put the
        optimizer step last (or leave it out): it will not run on bad gradients.
    *args, **kwargs
        Passed to ``fn``.

    Returns
    -------
    OpLocation or None
        None when no operation made a non-finite value from finite inputs: the inf/NaN
        came in with the data or the parameters (or there was none).

    Raises
    ------
    TypeError
        If ``fn`` is not callable.

    Examples
    --------
    >>> def step(x):
    ...     torch.log(x).sum().backward()
    >>> locate(step, torch.zeros(2, requires_grad=True)).op
    'aten.log.default'

    Notes
    -----
    ``torch.compile``'d code is opaque to dispatch modes: call the eager model.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    modules = _ModuleStack()
    finder = _NonfiniteFinder(modules)
    with modules, _NodeTagger(modules), finder:
        try:
            fn(*args, **kwargs)
        except _Found:
            pass
        except RuntimeError:
            # Raised from inside autograd, _Found may arrive wrapped.
            if finder.location is None:
                raise
    return finder.location


class _ModuleStack:
    """The path of the module whose forward is running, from global module hooks."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, dict[int, str]]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _ModuleStack:
        hooks = torch.nn.modules.module
        self._handles = [
            hooks.register_module_forward_pre_hook(self._enter),
            hooks.register_module_forward_hook(self._exit, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._stack.clear()

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        if self._stack and id(module) in self._stack[-1][1]:
            names = self._stack[-1][1]
            self._stack.append((names[id(module)], names))
            return
        # A module outside the current tree starts its own: paths relative to it.
        names = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}
        path = "" if not self._stack else f"<{type(module).__name__}>"
        self._stack.append((path, {k: _join(path, v) for k, v in names.items()}))

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    @property
    def current(self) -> str | None:
        return self._stack[-1][0] if self._stack else None


def _join(prefix: str, name: str) -> str:
    if prefix and prefix.startswith("<"):
        return f"{prefix}.{name}" if name else prefix
    return name


def _user_frame() -> tuple[str | None, str | None]:
    """``("file:line", code)`` of the innermost caller outside torch and finite."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<frozen"):
            code = linecache.getline(filename, frame.f_lineno).strip() or None
            return f"{frame.f_code.co_filename}:{frame.f_lineno}", code
        frame = frame.f_back
    return None, None


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _NodeTagger(TorchFunctionMode):
    """Tags the autograd nodes each torch call creates with its module and source line."""

    def __init__(self, modules: _ModuleStack) -> None:
        super().__init__()
        self._modules = modules
        # Nodes created before locate() started are not ours to tag.
        probe = torch.zeros(1, requires_grad=True).clone().grad_fn
        assert probe is not None
        self._first_sequence_nr = probe._sequence_nr() + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        tag = None
        for tensor in _tensors(out):
            pending = [tensor.grad_fn]
            while pending:
                node = pending.pop()
                if node is None or _TAG in node.metadata:
                    continue
                if node._sequence_nr() < self._first_sequence_nr or hasattr(node, "variable"):
                    continue  # older than this run, or a parameter's AccumulateGrad
                if tag is None:
                    tag = (self._modules.current, *_user_frame())
                node.metadata[_TAG] = tag
                pending.extend(next_node for next_node, _ in node.next_functions)
        return out


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            return True
        return bool(torch.isfinite(value).all())
    if isinstance(value, (float, complex)):
        return math.isfinite(abs(value))
    if isinstance(value, (list, tuple)):
        return all(_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    return True


class _NonfiniteFinder(TorchDispatchMode):
    """Records the first aten op with finite inputs and a non-finite output."""

    def __init__(self, modules: _ModuleStack) -> None:
        super().__init__()
        self._modules = modules
        self.location: OpLocation | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        check = self.location is None and not func._schema.name.startswith(_UNINITIALISED_PREFIXES)
        inputs_finite = check and _finite(args) and _finite(kwargs)
        out = func(*args, **kwargs)
        if inputs_finite and not _finite(out):
            self.location = self._where(func)
            raise _Found(str(self.location))
        return out

    def _where(self, func: Any) -> OpLocation:
        op = str(func)  # "aten.div.Tensor"
        node = torch._C._current_autograd_node()
        if node is None:
            source, code = _user_frame()
            return OpLocation(op, self._modules.current, source, "forward", code)
        metadata: dict = node.metadata  # type: ignore[assignment]
        module, source, code = metadata.get(_TAG, (None, None, None))
        return OpLocation(op, module, source, "backward", code)
