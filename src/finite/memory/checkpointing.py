"""Gradient checkpointing applied to an existing model, in place, without renaming anything.

A checkpointed module keeps only its inputs for the backward and runs its forward again
when the backward reaches it (Chen et al. 2016). Here that is done with
:func:`torch.utils.checkpoint.checkpoint` in its non-reentrant form, with the random state
saved and restored around the recomputation, so dropout draws the same mask twice and loss
and gradients are bit-for-bit those of the model without checkpointing.

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
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "apply_checkpointing",
    "checkpoint_sequential",
    "is_checkpointed",
    "remove_checkpointing",
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

    Returns
    -------
    list of str
        Paths of the modules now checkpointed (those already checkpointed included).

    Raises
    ------
    TypeError
        If ``model`` is not a module or ``targets`` is none of the accepted kinds.
    ValueError
        If a path in ``targets`` names no module of ``model``.

    Notes
    -----
    Each checkpointed module's forward runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, preserve_rng_state=True)``
    when gradients are enabled, and plainly otherwise. Recomputation doubles any side
    effect of the forward (batch-norm running statistics are updated twice per step).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    >>> apply_checkpointing(model, ["0", "2"])
    ['0', '2']
    >>> apply_checkpointing(model, torch.nn.Linear)
    ['0', '1', '2']

    References
    ----------
    Chen et al. (2016), Training Deep Nets with Sublinear Memory Cost.
    """
    _require_module(model)
    selected = _as_predicate(model, targets)
    chosen: list[str] = []
    for path, module in model.named_modules():
        if any(_is_within(path, outer) for outer in chosen):
            continue
        if selected(path, module):
            _checkpoint_module(module)
            chosen.append(path)
    return chosen


def checkpoint_sequential(seq: nn.Sequential, segments: int | str = "sqrt") -> nn.Sequential:
    """Split ``seq`` into segments and checkpoint all but the last one, in place.

    With ``n`` layers in ``k`` segments only the ``k - 1`` segment inputs and the last
    segment's activations stay alive after the forward; ``k = sqrt(n)`` gives Chen et
    al.'s O(sqrt(n)) memory for about one extra forward. The last segment is not
    checkpointed: its backward runs first, right after the forward, so recomputing it
    would save nothing. Segments differ in length by at most one, the longer ones first.

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
    >>> seq = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(9)))
    >>> segment_bounds(checkpoint_sequential(seq))
    [(0, 3), (3, 6), (6, 9)]

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
        stop = start + base + (1 if index < longer else 0)
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
    restored = []
    for path, module in model.named_modules():
        if _restore_forward(module):
            restored.append(path)
    return restored


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module``'s forward was replaced by this module's checkpointing."""
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


def _run_layers(layers: list[nn.Module], input: Any) -> Any:
    for layer in layers:
        input = layer(input)
    return input


def _checkpoint_module(module: nn.Module) -> None:
    if is_checkpointed(module):
        return
    _replace_forward(module, _CheckpointedForward(module))


def _replace_forward(module: nn.Module, forward: _CheckpointedForward) -> None:
    if "forward" in module.__dict__:
        module.__dict__[_ORIGINAL_FORWARD] = module.__dict__["forward"]
    module.__dict__["forward"] = forward


def _restore_forward(module: nn.Module) -> bool:
    if not is_checkpointed(module):
        return False
    del module.__dict__["forward"]
    if _ORIGINAL_FORWARD in module.__dict__:
        module.__dict__["forward"] = module.__dict__.pop(_ORIGINAL_FORWARD)
    return True


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _is_within(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


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
        paths = list(targets)
        if not all(isinstance(p, str) for p in paths):
            raise TypeError(
                "targets must be module types, module paths (str) or a predicate; got an "
                f"iterable holding {sorted({type(p).__name__ for p in paths})}"
            )
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
