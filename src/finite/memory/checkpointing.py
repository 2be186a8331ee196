"""Gradient checkpointing applied to an existing model, in place, without renaming anything.

A checkpointed module keeps only its inputs for the backward and runs its forward again
when the backward reaches it (Chen et al. 2016). Here that is done with
:func:`torch.utils.checkpoint.checkpoint` in its non-reentrant form, with the random state
saved and restored around the recomputation, so dropout draws the same mask twice and loss
and gradients are bit-for-bit those of the model without checkpointing.

Consecutive children of an ``nn.Sequential`` or ``nn.ModuleList`` can also be checkpointed
as one *segment* (``"blocks[2:5]"``), which keeps only the segment's inputs: not the
activations between its modules, which those modules checkpointed one by one would keep.

The module's ``forward`` is replaced on the instance only (by a small picklable callable):
parameter names, the ``state_dict``, hooks and the class are unchanged, ``copy.deepcopy`` and
``torch.save`` of the whole module work, and :func:`remove_checkpointing` puts the original
back.

References
----------
.. [1] T. Chen, B. Xu, C. Zhang, C. Guestrin, "Training Deep Nets with Sublinear Memory
   Cost", arXiv:1604.06174, 2016.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "apply_checkpointing",
    "checkpoint_sequential",
    "is_checkpointed",
    "remove_checkpointing",
    "segment_bounds",
]

# Instance attribute holding an instance-level forward that checkpointing replaced (the
# class's forward is not stored: it is looked up again at each call).
_ORIGINAL_FORWARD = "_finite_original_forward"

Targets = type | tuple[type, ...] | str | Iterable[str] | Callable[[str, nn.Module], bool]


def apply_checkpointing(model: nn.Module, targets: Targets) -> list[str]:
    """Checkpoint every module of ``model`` that ``targets`` selects, in place.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its modules are changed in place.
    targets : type, tuple of types, str, iterable of str, or callable
        Which modules to checkpoint: module classes (``isinstance``), module paths as in
        :meth:`~torch.nn.Module.named_modules` (``"blocks.3"``; every path must exist), or
        a predicate ``targets(path, module) -> bool``. A selected module inside another
        selected one is left alone: the outer checkpoint already recomputes it.

        A string ``"blocks[2:5]"`` (Python slice, by position) selects a *segment*: the
        children 2, 3 and 4 of the ``nn.Sequential`` or ``nn.ModuleList`` at ``"blocks"``
        (``"[2:5]"`` for the model itself) checkpointed as one unit, so that the
        activations between them are not kept either. The parent must run them as a
        chain, ``x = block(x)`` with nothing else using the intermediate ``x`` (always
        true for ``nn.Sequential``; :func:`~finite.memory.plan_checkpointing` checks it
        by observation before it proposes a segment).

    Returns
    -------
    list of str
        Paths (or segments) now checkpointed, those already checkpointed included.

    Raises
    ------
    TypeError
        If ``model`` is not a module or ``targets`` is none of the accepted kinds.
    ValueError
        If a path in ``targets`` names no module of ``model``, or a segment is empty,
        out of range, not in an ``nn.Sequential``/``nn.ModuleList``, or overlaps another.

    Notes
    -----
    Each checkpointed module's (or segment's) forward runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, preserve_rng_state=True)``
    when gradients are enabled, and plainly otherwise. Recomputation doubles any side
    effect of the forward (batch-norm running statistics are updated twice per step).

    In a segment, the first module's call runs the whole segment and returns its output;
    the parent's calls of the other modules then hand that output on unchanged (their
    forward hooks see it as both input and output). A call that does not continue the
    chain (another input, other extra arguments) raises ``RuntimeError`` instead of
    computing something else.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    >>> apply_checkpointing(model, ["0", "2"])
    ['0', '2']
    >>> apply_checkpointing(model, torch.nn.Linear)
    ['0', '1', '2']
    >>> _ = remove_checkpointing(model)
    >>> apply_checkpointing(model, ["[0:2]"])
    ['[0:2]']

    References
    ----------
    Chen et al. (2016), Training Deep Nets with Sublinear Memory Cost.
    """
    _require_module(model)
    selected, segments = _as_selection(model, targets)
    modules = dict(model.named_modules())
    by_head = {segment.members[0]: segment for segment in segments}
    covered: list[str] = []
    chosen: list[str] = []
    for path, module in model.named_modules():
        if any(_is_within(path, outer) for outer in covered):
            continue
        segment = by_head.get(path)
        if segment is not None:
            _checkpoint_run(segment, [modules[p] for p in segment.members])
            chosen.append(segment.name)
            covered.extend(segment.members)
        elif selected(path, module):
            _checkpoint_module(module)
            chosen.append(path)
            covered.append(path)
    return chosen


def checkpoint_sequential(seq: nn.Sequential, segments: int | str = "sqrt") -> nn.Sequential:
    """Split ``seq`` into segments and checkpoint all but the last one, in place.

    With ``n`` layers in ``k`` segments only the ``k - 1`` segment inputs and the last
    segment's activations stay alive after the forward; ``k = sqrt(n)`` gives Chen et
    al.'s O(sqrt(n)) memory for about one extra forward. The last segment is not
    checkpointed: its backward runs first, right after the forward, so recomputing it
    would save nothing. Segments differ in length by at most one, the longer ones *last*:
    the backward's peak is set by the longest segment (held whole at the start of the
    backward if it is the last one, or recomputed whole later otherwise), so a longer last
    segment costs no peak memory and recomputes one layer less.

    Parameters
    ----------
    seq : torch.nn.Sequential
        Changed in place and returned; its layers and ``state_dict`` are untouched.
    segments : int or "sqrt", default "sqrt"
        Number of segments, in ``[1, len(seq)]``; ``"sqrt"`` is ``round(sqrt(len(seq)))``.
        One segment checkpoints nothing.

    Returns
    -------
    torch.nn.Sequential
        ``seq`` itself.

    Raises
    ------
    TypeError
        If ``seq`` is not an ``nn.Sequential`` or ``segments`` is neither an int nor
        ``"sqrt"``.
    ValueError
        If ``seq`` is empty or ``segments`` is out of range.

    Examples
    --------
    >>> import torch
    >>> seq = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(10)))
    >>> segment_bounds(checkpoint_sequential(seq, 3))
    [(0, 3), (3, 6), (6, 10)]

    References
    ----------
    Chen et al. (2016), Training Deep Nets with Sublinear Memory Cost, section 4.
    """
    if not isinstance(seq, nn.Sequential):
        raise TypeError(f"seq must be a torch.nn.Sequential, got {type(seq).__name__}")
    layers = len(seq)
    if layers == 0:
        raise ValueError("seq is empty: there is nothing to checkpoint")
    if isinstance(segments, str):
        if segments != "sqrt":
            raise ValueError(f"segments must be an int or 'sqrt', got {segments!r}")
        count = max(1, round(math.sqrt(layers)))
    elif isinstance(segments, bool) or not isinstance(segments, int):
        raise TypeError(f"segments must be an int or 'sqrt', got {type(segments).__name__}")
    else:
        count = segments
        if not 1 <= count <= layers:
            raise ValueError(
                f"segments must be in [1, {layers}] for a Sequential of {layers} layers, "
                f"got {count}"
            )
    base, longer = divmod(layers, count)
    bounds, start = [], 0
    for index in range(count):
        stop = start + base + (1 if index >= count - longer else 0)
        bounds.append((start, stop))
        start = stop
    _restore_forward(seq)
    _replace_forward(seq, _SegmentedForward(seq, tuple(bounds)))
    return seq


def segment_bounds(seq: nn.Sequential) -> list[tuple[int, int]]:
    """The ``(start, stop)`` layer ranges of a Sequential segmented by
    :func:`checkpoint_sequential`, or ``[]`` if it is not segmented."""
    forward = seq.__dict__.get("forward")
    return list(forward.bounds) if isinstance(forward, _SegmentedForward) else []


def remove_checkpointing(model: nn.Module) -> list[str]:
    """Undo :func:`apply_checkpointing` and :func:`checkpoint_sequential` in ``model``.

    Returns the paths of the modules whose original forward was restored.
    """
    _require_module(model)
    restored: set[int] = set()
    for module in list(model.modules()):
        restored.update(id(m) for m in _restore_forward(module))
    return [path for path, module in model.named_modules() if id(module) in restored]


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module``'s forward was replaced by this module's checkpointing (alone,
    as part of a segment, or as a segmented ``nn.Sequential``)."""
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)


# --------------------------------------------------------------------------------------
# the replaced forwards
# --------------------------------------------------------------------------------------


class _CheckpointedForward:
    """``module.forward`` replaced: the original forward under a non-reentrant checkpoint.

    An instance, not a closure, so that deepcopy and pickle see plain attributes.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def original(self) -> Callable:
        saved = self.module.__dict__.get(_ORIGINAL_FORWARD)
        if saved is not None:
            return saved
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original()
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        function = functools.partial(original, **kwargs) if kwargs else original
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True)


class _SegmentedForward(_CheckpointedForward):
    """``Sequential.forward`` replaced: segments of layers, all but the last checkpointed."""

    def __init__(self, module: nn.Sequential, bounds: tuple[tuple[int, int], ...]) -> None:
        super().__init__(module)
        self.bounds = bounds

    def __call__(self, input: Any) -> Any:
        layers = list(self.module.children())
        last = len(self.bounds) - 1
        for index, (start, stop) in enumerate(self.bounds):
            run = functools.partial(_run_layers, layers[start:stop])
            if index < last and torch.is_grad_enabled():
                input = checkpoint(run, input, use_reentrant=False, preserve_rng_state=True)
            else:
                input = run(input)
        return input


class _Run:
    """Consecutive sibling modules checkpointed as one segment: their shared state.

    The per-thread state says whether the segment is being run (forward or recomputation:
    the members then run their own forward) and, between the first module's call and the
    parent's calls of the others, which output they must hand on.
    """

    def __init__(self, name: str, modules: list[nn.Module]) -> None:
        self.name = name
        self.modules = modules
        self._local = threading.local()

    def state(self) -> threading.local:
        local = self._local
        if not hasattr(local, "running"):
            local.running = 0
            local.pending = None
        return local

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "modules": self.modules}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self.modules = state["modules"]
        self._local = threading.local()


class _Pending:
    """The segment's output, waiting for the parent to call the remaining members."""

    def __init__(self, output: torch.Tensor, rest: tuple, kwargs: dict[str, Any]) -> None:
        self.output = weakref.ref(output)
        self.rest = rest
        self.kwargs = kwargs
        self.next_index = 1

    def continues(self, index: int, args: tuple, kwargs: dict[str, Any]) -> bool:
        output = self.output()
        return (
            output is not None
            and index == self.next_index
            and len(args) == len(self.rest) + 1
            and args[0] is output
            and all(a is b for a, b in zip(args[1:], self.rest, strict=True))
            and kwargs.keys() == self.kwargs.keys()
            and all(kwargs[k] is self.kwargs[k] for k in kwargs)
        )


class _RunHeadForward(_CheckpointedForward):
    """First module of a segment: runs every member under one checkpoint."""

    def __init__(self, module: nn.Module, run: _Run) -> None:
        super().__init__(module)
        self.run = run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original()
        run = self.run
        state = run.state()
        state.pending = None
        if (
            state.running
            or not torch.is_grad_enabled()
            or not args
            or not isinstance(args[0], torch.Tensor)
        ):
            # Without gradients every member runs its own forward when the parent calls it.
            return original(*args, **kwargs)

        def segment(*inputs: Any) -> Any:
            # The recomputation may run on another thread (autograd's device threads).
            local = run.state()
            local.running += 1
            try:
                output = original(*inputs, **kwargs)
                for module in run.modules[1:]:
                    output = module(output, *inputs[1:], **kwargs)
            finally:
                local.running -= 1
            return output

        output = checkpoint(segment, *args, use_reentrant=False, preserve_rng_state=True)
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(
                f"the checkpointed segment {run.name!r} returned a "
                f"{type(output).__name__}: a segment's modules must return one tensor, "
                "the next one's input. Checkpoint these modules one by one instead."
            )
        state.pending = _Pending(output, args[1:], kwargs)
        return output


class _RunMemberForward(_CheckpointedForward):
    """A later module of a segment: already run by the first one, hands its output on."""

    def __init__(self, module: nn.Module, run: _Run, index: int) -> None:
        super().__init__(module)
        self.run = run
        self.index = index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original()
        run = self.run
        state = run.state()
        if state.running or state.pending is None:
            return original(*args, **kwargs)
        pending = state.pending
        if not pending.continues(self.index, args, kwargs):
            state.pending = None
            raise RuntimeError(
                f"module {self.index} of the checkpointed segment {run.name!r} was called "
                "with something other than the output of the module before it (with the "
                "same extra arguments): its parent does not run the segment as a chain "
                "x = module(x). Checkpoint these modules one by one instead."
            )
        pending.next_index += 1
        if pending.next_index == len(run.modules):
            state.pending = None
        return args[0]


def _run_layers(layers: list[nn.Module], input: Any) -> Any:
    for layer in layers:
        input = layer(input)
    return input


def _checkpoint_module(module: nn.Module) -> None:
    if is_checkpointed(module):
        return
    _replace_forward(module, _CheckpointedForward(module))


def _checkpoint_run(segment: _SegmentSpec, members: list[nn.Module]) -> None:
    if len(members) == 1:
        _checkpoint_module(members[0])
        return
    head = members[0].__dict__.get("forward")
    if isinstance(head, _RunHeadForward) and head.run.modules == members:
        return
    for member in members:
        _restore_forward(member)
    run = _Run(segment.name, members)
    _replace_forward(members[0], _RunHeadForward(members[0], run))
    for index, member in enumerate(members[1:], start=1):
        _replace_forward(member, _RunMemberForward(member, run, index))


def _replace_forward(module: nn.Module, forward: _CheckpointedForward) -> None:
    if "forward" in module.__dict__:
        module.__dict__[_ORIGINAL_FORWARD] = module.__dict__["forward"]
    module.__dict__["forward"] = forward


def _restore_forward(module: nn.Module) -> list[nn.Module]:
    """Put back ``module``'s forward; a segment is restored whole (a member restored alone
    would be run twice). Returns the modules restored."""
    forward = module.__dict__.get("forward")
    if not isinstance(forward, _CheckpointedForward):
        return []
    members = (
        forward.run.modules
        if isinstance(forward, (_RunHeadForward, _RunMemberForward))
        else [module]
    )
    restored = []
    for member in members:
        if isinstance(member.__dict__.get("forward"), _CheckpointedForward):
            del member.__dict__["forward"]
            if _ORIGINAL_FORWARD in member.__dict__:
                member.__dict__["forward"] = member.__dict__.pop(_ORIGINAL_FORWARD)
            restored.append(member)
    return restored


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _is_within(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


@dataclass(frozen=True)
class _SegmentSpec:
    """``parent[start:stop]``: consecutive children of a Sequential/ModuleList."""

    name: str
    parent: str
    start: int
    stop: int
    members: tuple[str, ...]


_SEGMENT = re.compile(r"^(?P<parent>.*)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def _segment_name(parent: str, start: int, stop: int) -> str:
    """The target string of the segment ``parent[start:stop]`` (see
    :func:`apply_checkpointing`)."""
    return f"{parent}[{start}:{stop}]"


def _parse_segment(modules: dict[str, nn.Module], text: str) -> _SegmentSpec | None:
    match = _SEGMENT.match(text)
    if match is None:
        return None
    parent, start, stop = match["parent"], int(match["start"]), int(match["stop"])
    container = modules.get(parent)
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        kind = "no module" if container is None else type(container).__name__
        raise ValueError(
            f"segment {text!r}: {parent!r} must name an nn.Sequential or nn.ModuleList of "
            f"the model, got {kind}"
        )
    names = list(container._modules)
    if not 0 <= start < stop <= len(names):
        raise ValueError(
            f"segment {text!r}: need 0 <= start < stop <= {len(names)} (the length of "
            f"{parent or 'the model'}), got [{start}:{stop}]"
        )
    members = tuple(f"{parent}.{name}" if parent else name for name in names[start:stop])
    return _SegmentSpec(_segment_name(parent, start, stop), parent, start, stop, members)


def _as_selection(
    model: nn.Module, targets: object
) -> tuple[Callable[[str, nn.Module], bool], list[_SegmentSpec]]:
    """A predicate for single modules and the segments among ``targets``."""
    if isinstance(targets, str):
        targets = [targets]
    types = isinstance(targets, tuple) and bool(targets)
    types = types and all(isinstance(t, type) for t in targets)  # type: ignore[union-attr]
    if isinstance(targets, type) or types or callable(targets):
        return _as_predicate(model, targets), []
    if isinstance(targets, Iterable):
        items = _paths(targets)
        modules = dict(model.named_modules())
        segments, paths = [], []
        for item in items:
            segment = _parse_segment(modules, item) if item not in modules else None
            if segment is None:
                paths.append(item)
            else:
                segments.append(segment)
        for a, b in itertools.combinations(segments, 2):
            if a.parent == b.parent and a.start < b.stop and b.start < a.stop:
                raise ValueError(f"segments {a.name!r} and {b.name!r} overlap")
        return _as_predicate(model, paths), segments
    return _as_predicate(model, targets), []


def _paths(targets: Iterable[object]) -> list[str]:
    """``targets`` as a list of module paths; TypeError naming what else it holds."""
    items = list(targets)
    if not all(isinstance(p, str) for p in items):
        raise TypeError(
            "targets must be module types, module paths (str) or a predicate; got an "
            f"iterable holding {sorted({type(p).__name__ for p in items})}"
        )
    return items  # type: ignore[return-value]


def _as_predicate(model: nn.Module, targets: object) -> Callable[[str, nn.Module], bool]:
    if isinstance(targets, type):
        targets = (targets,)
    if isinstance(targets, tuple) and targets and all(isinstance(t, type) for t in targets):
        bad = [t.__name__ for t in targets if not issubclass(t, nn.Module)]
        if bad:
            raise TypeError(f"targets must be nn.Module subclasses, got {', '.join(bad)}")
        classes: tuple[type, ...] = targets
        return lambda path, module: isinstance(module, classes)
    if isinstance(targets, str):
        targets = [targets]
    if callable(targets):
        return targets  # type: ignore[return-value]
    if isinstance(targets, Iterable):
        paths = _paths(targets)
        known = {path for path, _ in model.named_modules()}
        missing = [p for p in paths if p not in known]
        if missing:
            raise ValueError(f"targets names no module of the model: {missing}")
        wanted = set(paths)
        return lambda path, module: path in wanted
    raise TypeError(
        "targets must be module types, module paths (str) or a predicate "
        f"(path, module) -> bool; got {type(targets).__name__}"
    )
