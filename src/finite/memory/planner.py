"""Choose what to checkpoint: the least recomputation whose activations fit a memory budget.

The candidates are modules ("units": by default every child of an ``nn.Sequential`` or
``nn.ModuleList``) and *segments*, runs of consecutive units of one container checkpointed
as one (see :func:`~finite.memory.apply_checkpointing`). A segment recomputes the same
blocks as its units checkpointed one by one, but it also drops the activations between
them, which the units' own checkpoints keep as their inputs.

1. **Trace.** One forward, gradients on, records every tensor saved for the backward (the
   pack hook of :func:`torch.autograd.graph.saved_tensors_hooks`) with the unit whose
   forward saved it, and the positional inputs of every unit (what a checkpoint keeps).
   It also observes whether a container runs its units as a chain: unit ``i + 1`` called
   right after unit ``i`` with ``i``'s output and the same other arguments, and nothing
   else using that output. Only such neighbours form segments.
2. **Bytes of any plan.** A storage stays saved when an op outside every checkpointed
   region saved it, or when it is an input of a region's first unit; everything else is
   dropped. This gives, for every candidate ``r`` alone, ``saved_r`` (bytes it removes)
   and ``recompute_r`` (bytes its recomputation brings back during the backward), and
   ``predicted_bytes`` for the chosen set.
3. **Time.** ``time_r`` is the sum of its units' forward times (median over ``repeats``
   forwards), which is what recomputing it costs.
4. **Choice.** The activations at the backward's peak are at most those kept by the
   forward plus the largest recomputed region's, so the planner solves

       minimise  sum(time_r)  over disjoint candidates  C
       subject to  baseline - sum(saved_r for r in C) + max(recompute_r for r in C) <= budget

   (without the last term one segment spanning the whole model would fit any budget while
   its recomputation rebuilds every activation at once). For each cap ``U`` on
   ``recompute_r`` it covers ``baseline - budget + U`` bytes of savings: exactly, by a
   dynamic program over positions in each chain on the Pareto front of (bytes saved, time),
   for up to :data:`EXACT_MAX_CANDIDATES` units; above that, greedily: each chain is tiled
   into the longest segments within the cap, tiles are taken in increasing time per byte
   saved, then any tile that is not needed is dropped, most expensive first. The best cap
   wins. Savings are assumed to add up; the chosen set is evaluated exactly (step 2) and
   measured with :func:`~finite.memory.activation_memory` after applying it, and a
   shortfall is added to the requirement and the problem solved again (a few rounds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from finite.memory.activations import (
    _cuda_devices,
    _module_forward_seconds,
    _preserved_state,
    _SavedTensorRecorder,
    _storage_key,
    _tensors_in,
    activation_memory,
)
from finite.memory.checkpointing import (
    Targets,
    _as_selection,
    _is_within,
    _restore_forward,
    _segment_name,
    apply_checkpointing,
    is_checkpointed,
)

__all__ = ["EXACT_MAX_CANDIDATES", "CandidateCost", "CheckpointPlan", "plan_checkpointing"]

#: Up to this many units the plan is optimal (dynamic program); above it, greedy.
EXACT_MAX_CANDIDATES = 20

_REPAIR_ROUNDS = 3


@dataclass(frozen=True)
class CandidateCost:
    """What checkpointing one module (or one segment) costs and saves.

    Attributes
    ----------
    path : str
        The module's path in the model, or a segment ``"blocks[2:5]"``.
    saved_bytes : int
        Activation bytes removed by checkpointing it alone (can be <= 0 for a module whose
        inputs are as large as what it saves; such a candidate is never chosen).
    forward_seconds : float
        Median wall time of its forward, the cost of recomputing it in the backward.
    recompute_bytes : int
        Activation bytes its recomputation brings back during the backward.
    """

    path: str
    saved_bytes: int
    forward_seconds: float
    recompute_bytes: int = 0


@dataclass(frozen=True)
class CheckpointPlan:
    """The modules and segments to checkpoint for a budget, with the bytes predicted and
    measured.

    Attributes
    ----------
    budget_bytes : int
        The activation-memory budget asked for.
    baseline_bytes : int
        Activation bytes of the model as it was given (``activation_memory().total_bytes``).
    candidates : tuple of CandidateCost
        Every candidate module with its saving, forward time and recomputed bytes alone.
    chosen : tuple of str
        What to checkpoint: module paths, and segments as ``"blocks[2:5]"``.
    predicted_bytes : int
        Activation bytes kept by the forward with ``chosen`` checkpointed, predicted from
        the traced forward.
    measured_bytes : int
        The same, measured by :func:`~finite.memory.activation_memory` with ``chosen``
        applied.
    recompute_seconds : float
        Forward time of everything recomputed: the extra time per backward.
    method : str
        ``"exact"`` (dynamic program) or ``"greedy"``.
    recompute_bytes : int
        The largest chosen candidate's recomputed bytes: during the backward, the
        activations held are at most ``measured_bytes + recompute_bytes``.
    chosen_costs : tuple of CandidateCost
        The saving, time and recomputed bytes of each entry of ``chosen``, in order.
    """

    budget_bytes: int
    baseline_bytes: int
    candidates: tuple[CandidateCost, ...]
    chosen: tuple[str, ...]
    predicted_bytes: int
    measured_bytes: int
    recompute_seconds: float
    method: str
    recompute_bytes: int = 0
    chosen_costs: tuple[CandidateCost, ...] = ()

    @property
    def peak_bytes(self) -> int:
        """``measured_bytes + recompute_bytes``: a bound on the activations held at any
        point of the step (what the budget limits)."""
        return self.measured_bytes + self.recompute_bytes

    @property
    def fits(self) -> bool:
        """Whether ``peak_bytes`` is within the budget."""
        return self.peak_bytes <= self.budget_bytes

    def apply(self, model: nn.Module) -> list[str]:
        """Checkpoint the chosen modules and segments of ``model`` (see
        :func:`apply_checkpointing`).

        Returns what was checkpointed. ``model`` should be the planned model or one with
        the same module paths (e.g. a copy).
        """
        if not self.chosen:
            return []
        return apply_checkpointing(model, list(self.chosen))


def plan_checkpointing(
    model: nn.Module,
    example_args: Any,
    budget_bytes: int,
    targets: Targets | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    repeats: int = 3,
    segments: bool = True,
) -> CheckpointPlan:
    """Plan which modules and segments to checkpoint so the activations fit ``budget_bytes``.

    Traces one forward on ``example_args`` and times every candidate (see the module
    docstring for the algorithm), chooses the candidates with the least recomputation time
    whose activations fit the budget, and measures that choice once more. The model is
    left as it was: apply the plan with :meth:`CheckpointPlan.apply`.

    The budget is in the units of :func:`activation_memory` and bounds the activations at
    the backward's peak: the bytes saved by the forward (``measured_bytes``) plus those
    that the largest checkpointed candidate rebuilds while it is recomputed
    (``recompute_bytes``).

    Parameters
    ----------
    model : torch.nn.Module
        The model, in training mode if that is how it will run.
    example_args : Tensor or tuple
        Positional inputs of one representative forward (a single tensor is allowed).
    budget_bytes : int
        Largest acceptable activation memory, in bytes.
    targets : optional
        Candidate modules, as in :func:`apply_checkpointing` (types, paths or a
        predicate; not segments, which the planner forms itself). Default: every child
        of an ``nn.Sequential`` or ``nn.ModuleList``, the usual "blocks". A candidate
        inside another candidate is dropped.
    example_kwargs : mapping, optional
        Keyword inputs of the forward.
    repeats : int, default 3
        Forward passes timed per candidate (the median is kept).
    segments : bool, default True
        Also consider runs of consecutive candidates that their container runs as a
        chain, checkpointed as one segment.

    Returns
    -------
    CheckpointPlan

    Raises
    ------
    TypeError
        If ``model`` is not a module or ``budget_bytes`` is not an int.
    ValueError
        If ``budget_bytes`` is negative, there is no candidate, or the budget is below
        the smallest peak any choice reaches (the message gives that minimum).

    Examples
    --------
    >>> import torch
    >>> Linear, Tanh = torch.nn.Linear, torch.nn.Tanh
    >>> blocks = [torch.nn.Sequential(Linear(64, 256), Tanh(), Linear(256, 64))
    ...           for _ in range(8)]
    >>> model = torch.nn.Sequential(*blocks)
    >>> x = torch.randn(32, 64)
    >>> full = activation_memory(model, x).total_bytes
    >>> plan = plan_checkpointing(model, x, budget_bytes=full // 2)
    >>> plan.fits, plan.predicted_bytes == plan.measured_bytes
    (True, True)
    >>> _ = plan.apply(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise TypeError(f"budget_bytes must be an int, got {type(budget_bytes).__name__}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(segments, bool):
        raise TypeError(f"segments must be a bool, got {type(segments).__name__}")
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})

    def measure(names: list[str]) -> int:
        with _applied(model, names):
            return activation_memory(model, *args, **kwargs).total_bytes

    units = _candidate_paths(model, targets)
    baseline = measure([])
    trace = _trace(model, units, args, kwargs, observe_chains=segments)
    seconds = _module_forward_seconds(model, units, args, kwargs, repeats)
    problem = _Problem(units, trace, [seconds[p] for p in units])
    candidates = tuple(problem.cost(problem.single[u]) for u in range(len(units)))

    if baseline <= budget_bytes:
        return CheckpointPlan(
            budget_bytes, baseline, candidates, (), baseline, baseline, 0.0, "exact"
        )
    floor_plan = _floor(problem.intervals, baseline)
    floor_kept = problem.kept_bytes(floor_plan)
    floor_peak = floor_kept + _recompute_bytes(floor_plan)
    if floor_peak > budget_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes} ({_mib(budget_bytes)}) is below the smallest "
            f"activation peak reachable by checkpointing the candidates: {floor_peak} bytes "
            f"({_mib(floor_peak)}): {floor_kept} bytes kept by the forward with "
            f"{sum(len(i.units) for i in floor_plan)} of {len(units)} candidates "
            f"checkpointed in {len(floor_plan)} regions, plus "
            f"{_recompute_bytes(floor_plan)} bytes while the largest is recomputed "
            f"(without checkpointing: {baseline} bytes). Raise the budget or pass finer "
            f"targets."
        )

    method = "exact" if len(units) <= EXACT_MAX_CANDIDATES else "greedy"
    solve = _solve_exact if method == "exact" else _solve_greedy
    need = baseline - budget_bytes
    chosen: list[_Interval] = []
    predicted = measured = baseline
    for attempt in range(_REPAIR_ROUNDS + 1):
        found = solve(problem.intervals, need)
        chosen = floor_plan if found is None else found
        final = found is None or attempt == _REPAIR_ROUNDS
        predicted = problem.kept_bytes(chosen)
        recompute = _recompute_bytes(chosen)
        # Savings that do not add up (storages shared between candidates) show here first.
        if predicted + recompute > budget_bytes and not final:
            need += predicted + recompute - budget_bytes
            continue
        measured = measure([i.name for i in chosen])
        if measured + recompute <= budget_bytes or final:
            break
        need += measured + recompute - budget_bytes
    if measured + _recompute_bytes(chosen) > budget_bytes and chosen is not floor_plan:
        # The repairs ran out: fall back on the choice with the smallest predicted peak.
        chosen = floor_plan
        predicted = floor_kept
        measured = measure([i.name for i in chosen])
    chosen.sort(key=lambda i: (i.chain, i.start))
    return CheckpointPlan(
        budget_bytes=budget_bytes,
        baseline_bytes=baseline,
        candidates=candidates,
        chosen=tuple(i.name for i in chosen),
        predicted_bytes=predicted,
        measured_bytes=measured,
        recompute_seconds=sum(i.seconds for i in chosen),
        method=method,
        recompute_bytes=_recompute_bytes(chosen),
        chosen_costs=tuple(problem.cost(i) for i in chosen),
    )


# --------------------------------------------------------------------------------------
# candidates
# --------------------------------------------------------------------------------------


def _candidate_paths(model: nn.Module, targets: Targets | None) -> list[str]:
    if targets is None:
        parents = {}
        for path, module in model.named_modules():
            for name, _ in module.named_children():
                parents[f"{path}.{name}" if path else name] = module

        def targets(path: str, module: nn.Module) -> bool:
            return isinstance(parents.get(path), (nn.Sequential, nn.ModuleList))

    selected, segment_specs = _as_selection(model, targets)
    if segment_specs:
        raise ValueError(
            "targets of plan_checkpointing name modules, not segments (got "
            f"{[s.name for s in segment_specs]}); the planner forms segments itself"
        )
    # apply_checkpointing's selection (outermost wins), without changing the model.
    paths: list[str] = []
    for path, module in model.named_modules():
        if path == "" or any(_is_within(path, outer) for outer in paths):
            continue
        if is_checkpointed(module):
            continue
        if selected(path, module):
            paths.append(path)
    if not paths:
        raise ValueError(
            "no candidate module to checkpoint: targets selected none (the default is "
            "every child of an nn.Sequential or nn.ModuleList); pass targets="
        )
    return paths


class _applied:
    """Checkpoint ``names`` for the duration of a ``with`` block, then undo exactly that."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.names = names
        self.modules: list[nn.Module] = []

    def __enter__(self) -> None:
        if not self.names:
            return
        before = {id(m) for m in self.model.modules() if is_checkpointed(m)}
        apply_checkpointing(self.model, self.names)
        self.modules = [
            m for m in self.model.modules() if is_checkpointed(m) and id(m) not in before
        ]

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            _restore_forward(module)


# --------------------------------------------------------------------------------------
# the traced forward
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Storage:
    """One block of memory seen by the traced forward."""

    nbytes: int
    savers: frozenset[int]  # units whose forward saved it for the backward
    outside: bool  # saved by an op outside every unit
    input_of: frozenset[int]  # units with it among their positional inputs


@dataclass(frozen=True)
class _Trace:
    storages: tuple[_Storage, ...]
    links: frozenset[int]  # u: units u and successor[u] run as a chain
    successor: tuple[int | None, ...]
    position: tuple[tuple[str, int] | None, ...]  # (container path, index) per unit


class _ChainWatch(TorchFunctionMode):
    """Sees every torch call of the forward: which unit outputs are used, and where."""

    def __init__(self, successor: tuple[int | None, ...]) -> None:
        super().__init__()
        self.successor = successor
        self.depth = [0] * len(successor)
        self.watched: dict[int, tuple[int, torch.Tensor]] = {}  # id -> (unit, output)
        self.between: int | None = None  # a unit has returned and nothing ran since
        self.broken: set[int] = set()
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if self.between is not None:
            # Something ran between a unit and the next one: not a plain chain.
            self.broken.add(self.between)
            self.between = None
        if self.watched:
            for tensor in _tensors_in((args, kwargs)):
                seen = self.watched.get(id(tensor))
                if seen is not None and seen[1] is tensor:
                    following = self.successor[seen[0]]
                    if following is None or self.depth[following] == 0:
                        self.broken.add(seen[0])
        return func(*args, **kwargs)


def _unit_positions(model: nn.Module, units: list[str]) -> list[tuple[str, int] | None]:
    modules = dict(model.named_modules())
    positions: list[tuple[str, int] | None] = []
    for path in units:
        parent, _, name = path.rpartition(".")
        container = modules.get(parent)
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            positions.append((parent, list(container._modules).index(name)))
        else:
            positions.append(None)
    return positions


def _trace(
    model: nn.Module,
    units: list[str],
    args: tuple,
    kwargs: Mapping[str, Any],
    observe_chains: bool,
) -> _Trace:
    modules = dict(model.named_modules())
    position = _unit_positions(model, units)
    index_at = {pos: u for u, pos in enumerate(position) if pos is not None}
    successor = tuple(
        None if pos is None else index_at.get((pos[0], pos[1] + 1)) for pos in position
    )
    owner = {}
    for path in modules:
        for u, unit in enumerate(units):
            if _is_within(path, unit):
                owner[path] = u
                break
    recorder = _SavedTensorRecorder(model)
    watch = _ChainWatch(successor)
    n = len(units)
    calls = [0] * n
    inputs: dict[tuple[str, int], tuple[int, set[int]]] = {}
    held: list[torch.Tensor] = []  # alive until the end: no address is reused meanwhile
    outputs: list[Any] = [None] * n
    extra: list[Any] = [None] * n
    continued: set[int] = set()

    def before(u: int):
        def hook(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
            calls[u] += 1
            previous = watch.between
            watch.between = None
            if previous is not None and successor[previous] == u:
                same_extra = extra[previous] is not None and _same_arguments(
                    extra[previous], call_args[1:], call_kwargs
                )
                if call_args and call_args[0] is outputs[previous] and same_extra:
                    continued.add(previous)
            elif previous is not None:
                watch.broken.add(previous)
            extra[u] = (call_args[1:], dict(call_kwargs))
            watch.depth[u] += 1
            watch.paused = True  # the storage look-ups below are not the model's
            try:
                for tensor in call_args:
                    if isinstance(tensor, torch.Tensor):
                        key, nbytes = _storage_key(tensor)
                        if key not in recorder.parameter_keys:
                            inputs.setdefault(key, (nbytes, set()))[1].add(u)
                            held.append(tensor)
            finally:
                watch.paused = False

        return hook

    def after(u: int):
        def hook(module: nn.Module, call_args: tuple, call_kwargs: dict, output: Any) -> None:
            watch.depth[u] -= 1
            outputs[u] = output
            held.append(output)
            if isinstance(output, torch.Tensor) and successor[u] is not None:
                watch.watched[id(output)] = (u, output)
                watch.between = u

        return hook

    handles = []
    for u, path in enumerate(units):
        module = modules[path]
        handles.append(module.register_forward_pre_hook(before(u), with_kwargs=True))
        handles.append(module.register_forward_hook(after(u), with_kwargs=True, always_call=True))
    try:
        devices = _cuda_devices(model, args, kwargs)
        with _preserved_state(model, devices), torch.enable_grad(), recorder.recording():
            if observe_chains:
                with watch:
                    output = model(*args, **kwargs)
            else:
                output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for tensor in _tensors_in(output):
        seen = watch.watched.get(id(tensor))
        if seen is not None and seen[1] is tensor:
            watch.broken.add(seen[0])  # the model returns it: it is needed as it is
    if watch.between is not None:
        watch.broken.add(watch.between)
    links = frozenset(
        u
        for u in continued - watch.broken
        if observe_chains and calls[u] == 1 and calls[successor[u]] == 1  # type: ignore[index]
    )

    savers: dict[tuple[str, int], tuple[int, set[int], list[bool]]] = {}
    for saved in recorder.saved:
        if saved.tensor() is None or saved.key in recorder.parameter_keys:
            continue  # released before the forward ended, or a parameter
        entry = savers.setdefault(saved.key, (saved.nbytes, set(), [False]))
        unit = owner.get(saved.module)
        if unit is None:
            entry[2][0] = True
        else:
            entry[1].add(unit)
    storages = []
    for key in savers.keys() | inputs.keys():
        nbytes, by, outside = savers.get(key, (0, set(), [False]))
        size, of = inputs.get(key, (nbytes, set()))
        storages.append(_Storage(max(nbytes, size), frozenset(by), outside[0], frozenset(of)))
    return _Trace(tuple(storages), links, successor, tuple(position))


def _same_arguments(previous: tuple, rest: tuple, kwargs: Mapping[str, Any]) -> bool:
    before_rest, before_kwargs = previous
    return (
        len(rest) == len(before_rest)
        and all(a is b for a, b in zip(rest, before_rest, strict=True))
        and kwargs.keys() == before_kwargs.keys()
        and all(kwargs[k] is before_kwargs[k] for k in kwargs)
    )


# --------------------------------------------------------------------------------------
# the problem: chains, intervals and the bytes of a plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Interval:
    """Units ``chains[chain][start:stop]`` checkpointed as one region."""

    name: str
    chain: int
    start: int
    stop: int
    units: tuple[int, ...]
    saved_bytes: int
    recompute_bytes: int
    seconds: float


class _Problem:
    """The traced storages, the chains of units, and every candidate region."""

    def __init__(self, units: list[str], trace: _Trace, seconds: list[float]) -> None:
        self.units = units
        self.storages = trace.storages
        self.kept_alone = [self._kept(s, frozenset(), frozenset()) for s in self.storages]
        self.touching: list[list[int]] = [[] for _ in units]
        for index, storage in enumerate(self.storages):
            for u in storage.savers | storage.input_of:
                self.touching[u].append(index)
        linked_from = {trace.successor[u] for u in trace.links}
        chains = []
        for u in range(len(units)):
            if u in linked_from:
                continue
            chain = [u]
            while chain[-1] in trace.links:
                chain.append(trace.successor[chain[-1]])  # type: ignore[arg-type]
            chains.append(chain)
        self.chains = chains
        self.intervals: list[_Interval] = []
        self.single: dict[int, _Interval] = {}
        for c, chain in enumerate(chains):
            for start in range(len(chain)):
                for stop in range(start + 1, len(chain) + 1):
                    members = tuple(chain[start:stop])
                    if len(members) == 1:
                        name = units[members[0]]
                    else:
                        parent, first = trace.position[members[0]]  # type: ignore[misc]
                        name = _segment_name(parent, first, first + len(members))
                    saved, rebuilt = self._alone(members)
                    interval = _Interval(
                        name,
                        c,
                        start,
                        stop,
                        members,
                        saved,
                        rebuilt,
                        math.fsum(seconds[u] for u in members),
                    )
                    self.intervals.append(interval)
                    if len(members) == 1:
                        self.single[members[0]] = interval

    @staticmethod
    def _kept(storage: _Storage, inside: frozenset[int], heads: frozenset[int]) -> bool:
        # Saved by an op that still runs without a checkpoint, or kept as the input of one.
        return bool(storage.outside or storage.savers - inside or storage.input_of & heads)

    def _alone(self, members: tuple[int, ...]) -> tuple[int, int]:
        inside, heads = frozenset(members), frozenset(members[:1])
        touched = {i for u in members for i in self.touching[u]}
        dropped = added = 0
        for i in touched:
            storage = self.storages[i]
            kept = self._kept(storage, inside, heads)
            if self.kept_alone[i] and not kept:
                dropped += storage.nbytes
            elif kept and not self.kept_alone[i]:
                added += storage.nbytes
        return dropped - added, dropped

    def kept_bytes(self, chosen: list[_Interval]) -> int:
        """Bytes the forward keeps with ``chosen`` checkpointed (every storage checked)."""
        inside = frozenset(u for i in chosen for u in i.units)
        heads = frozenset(i.units[0] for i in chosen)
        return sum(s.nbytes for s in self.storages if self._kept(s, inside, heads))

    def cost(self, interval: _Interval) -> CandidateCost:
        return CandidateCost(
            interval.name, interval.saved_bytes, interval.seconds, interval.recompute_bytes
        )


def _recompute_bytes(chosen: list[_Interval]) -> int:
    return max((i.recompute_bytes for i in chosen), default=0)


# --------------------------------------------------------------------------------------
# solvers: disjoint intervals, savings >= need + the largest recompute
# --------------------------------------------------------------------------------------

_State = tuple[int, float, tuple[_Interval, ...], int]  # capped saving, time, chosen, saving


def _ending_at(members: list[_Interval], cap: int) -> dict[int, list[_Interval]]:
    """The useful intervals of one chain that recompute at most ``cap`` bytes, by stop."""
    ending: dict[int, list[_Interval]] = {}
    for i in members:
        if i.saved_bytes > 0 and i.recompute_bytes <= cap:
            ending.setdefault(i.stop, []).append(i)
    return ending


def _by_chain(intervals: list[_Interval]) -> dict[int, list[_Interval]]:
    chains: dict[int, list[_Interval]] = {}
    for interval in intervals:
        chains.setdefault(interval.chain, []).append(interval)
    return chains


def _caps(intervals: list[_Interval]) -> list[int]:
    return sorted({i.recompute_bytes for i in intervals if i.saved_bytes > 0})


def _better(a: list[_Interval] | None, b: list[_Interval]) -> bool:
    """Whether ``b`` beats ``a``: less time, then a smaller predicted peak."""
    if a is None:
        return True
    key_a = (math.fsum(i.seconds for i in a), _recompute_bytes(a) - sum(i.saved_bytes for i in a))
    key_b = (math.fsum(i.seconds for i in b), _recompute_bytes(b) - sum(i.saved_bytes for i in b))
    return key_b < key_a


def _solve_exact(intervals: list[_Interval], need: int) -> list[_Interval] | None:
    """Least total time over disjoint intervals with ``sum(saved) >= need + max(recompute)``.

    For each cap ``U`` on ``recompute_bytes``: a dynamic program over the positions of
    each chain, keeping the Pareto front of (saving capped at ``need + U``, time). A state
    is dropped when another has at least its saving for at most its time; every optimal
    solution extends a non-dominated state, so each cap's answer is exact, and the optimum
    has some cap. Returns None when no choice meets the requirement.
    """
    best: list[_Interval] | None = None
    chains = _by_chain(intervals)
    for cap in _caps(intervals):
        required = need + cap
        front: list[_State] = [(0, 0.0, (), 0)]
        for members in chains.values():
            length = max(i.stop for i in members)
            ending = _ending_at(members, cap)
            fronts = [front]
            for stop in range(1, length + 1):
                states = list(fronts[stop - 1])
                for i in ending.get(stop, []):
                    states.extend(
                        (
                            min(required, saving + i.saved_bytes),
                            time + i.seconds,
                            (*chosen, i),
                            total + i.saved_bytes,
                        )
                        for saving, time, chosen, total in fronts[i.start]
                    )
                fronts.append(_pareto(states))
            front = fronts[-1]
        feasible = [s for s in front if s[0] >= required]
        if feasible:
            state = min(feasible, key=lambda s: (s[1], -s[3]))
            if _better(best, list(state[2])):
                best = list(state[2])
    return best


def _pareto(states: list[_State]) -> list[_State]:
    # Largest saving first; keep a state only if it is faster than every larger one.
    states.sort(key=lambda s: (-s[0], s[1], -s[3]))
    front, best_time = [], math.inf
    for state in states:
        if state[1] < best_time:
            front.append(state)
            best_time = state[1]
    return front


def _solve_greedy(intervals: list[_Interval], need: int) -> list[_Interval] | None:
    """For each cap ``U``: tile every chain into the longest intervals within the cap,
    take tiles in increasing time per byte saved until ``need + U`` is covered, then drop
    any tile that is not needed, most expensive first. The best cap wins."""
    best: list[_Interval] | None = None
    chains = _by_chain(intervals)
    for cap in _caps(intervals):
        required = need + cap
        tiles = []
        for members in chains.values():
            table = {(i.start, i.stop): i for i in members}
            length = max(i.stop for i in members)
            start = 0
            while start < length:
                stop, tile = start + 1, None
                while (start, stop) in table and table[(start, stop)].recompute_bytes <= cap:
                    if table[(start, stop)].saved_bytes > 0:
                        tile = table[(start, stop)]
                    stop += 1
                if tile is None:
                    start += 1
                else:
                    tiles.append(tile)
                    start = tile.stop
        ranked = sorted(tiles, key=lambda i: (i.seconds / i.saved_bytes, -i.saved_bytes))
        chosen, total = [], 0
        for tile in ranked:
            if total >= required:
                break
            chosen.append(tile)
            total += tile.saved_bytes
        if total < required:
            continue
        for tile in sorted(chosen, key=lambda i: -i.seconds):
            if total - tile.saved_bytes >= required:
                chosen.remove(tile)
                total -= tile.saved_bytes
        if _better(best, chosen):
            best = chosen
    return best


def _floor(intervals: list[_Interval], baseline: int) -> list[_Interval]:
    """The choice with the smallest predicted peak ``baseline - sum(saved) + max(recompute)``:
    for each cap, the disjoint intervals with the largest total saving (weighted interval
    scheduling per chain)."""
    best: list[_Interval] = []
    best_peak = baseline
    chains = _by_chain(intervals)
    for cap in _caps(intervals):
        chosen: list[_Interval] = []
        for members in chains.values():
            length = max(i.stop for i in members)
            ending = _ending_at(members, cap)
            most: list[tuple[int, tuple[_Interval, ...]]] = [(0, ())]
            for stop in range(1, length + 1):
                candidate = most[stop - 1]
                for i in ending.get(stop, []):
                    saving, picked = most[i.start]
                    if saving + i.saved_bytes > candidate[0]:
                        candidate = (saving + i.saved_bytes, (*picked, i))
                most.append(candidate)
            chosen.extend(most[-1][1])
        peak = baseline - sum(i.saved_bytes for i in chosen) + _recompute_bytes(chosen)
        if peak < best_peak:
            best, best_peak = chosen, peak
    return best


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB"
