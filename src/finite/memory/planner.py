"""Choose which modules to checkpoint: the least recomputation that fits a memory budget.

For each candidate module ``i`` the planner measures, on the example input,

* ``saved_i``: how many activation bytes checkpointing ``i`` alone removes (the baseline
  minus :func:`activation_memory` with ``i`` checkpointed: exact, views, the inputs the
  checkpoint keeps and sharing between modules included), and
* ``time_i``: the wall time of ``i``'s forward, which is what its recomputation costs.

It then solves the covering knapsack

    minimise  sum(time_i for i in C)  subject to  baseline - sum(saved_i for i in C) <= budget,

exactly for up to :data:`EXACT_MAX_CANDIDATES` candidates (a dynamic program over the
Pareto front of (bytes saved, time) pairs, which is exact because every item is either in or
out), and greedily above: candidates in increasing order of recompute time per byte saved
until the budget is met, then any chosen candidate whose removal still meets the budget is
dropped, most expensive first. Savings are assumed additive; the chosen set is measured
after applying it, and when the measurement misses the budget the shortfall is added to the
requirement and the problem solved again (a few rounds at most).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from finite.memory.activations import activation_memory, module_forward_seconds
from finite.memory.checkpointing import (
    Targets,
    _as_predicate,
    _is_within,
    _restore_forward,
    apply_checkpointing,
    is_checkpointed,
)

__all__ = ["EXACT_MAX_CANDIDATES", "CandidateCost", "CheckpointPlan", "plan_checkpointing"]

#: Up to this many candidates the plan is optimal (dynamic program); above it, greedy.
EXACT_MAX_CANDIDATES = 20

_REPAIR_ROUNDS = 3


@dataclass(frozen=True)
class CandidateCost:
    """What checkpointing one module costs and saves, measured on the example input.

    Attributes
    ----------
    path : str
        The module's path in the model.
    saved_bytes : int
        Activation bytes removed by checkpointing this module alone (can be <= 0 for a
        module whose inputs are as large as what it saves; such a module is never chosen).
    forward_seconds : float
        Median wall time of its forward, the cost of recomputing it in the backward.
    """

    path: str
    saved_bytes: int
    forward_seconds: float


@dataclass(frozen=True)
class CheckpointPlan:
    """The modules to checkpoint for a budget, with the bytes predicted and measured.

    Attributes
    ----------
    budget_bytes : int
        The activation-memory budget asked for.
    baseline_bytes : int
        Activation bytes of the model as it was given (``activation_memory().total_bytes``).
    candidates : tuple of CandidateCost
        Every candidate with its measured saving and forward time.
    chosen : tuple of str
        Paths of the modules to checkpoint.
    predicted_bytes : int
        ``baseline_bytes`` minus the chosen candidates' individual savings.
    measured_bytes : int
        Activation bytes measured with the chosen modules checkpointed.
    recompute_seconds : float
        Sum of the chosen modules' forward times: the extra time per backward.
    method : str
        ``"exact"`` (dynamic program) or ``"greedy"``.
    """

    budget_bytes: int
    baseline_bytes: int
    candidates: tuple[CandidateCost, ...]
    chosen: tuple[str, ...]
    predicted_bytes: int
    measured_bytes: int
    recompute_seconds: float
    method: str

    @property
    def fits(self) -> bool:
        """Whether the measured activation bytes are within the budget."""
        return self.measured_bytes <= self.budget_bytes

    def apply(self, model: nn.Module) -> list[str]:
        """Checkpoint the chosen modules of ``model`` (see :func:`apply_checkpointing`).

        Returns the paths checkpointed. ``model`` should be the planned model or one with
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
) -> CheckpointPlan:
    """Plan which modules to checkpoint so the activations fit ``budget_bytes``.

    Measures every candidate's saving and forward time on ``example_args`` (see the module
    docstring for the algorithm), chooses the set with the least recomputation time whose
    activation memory fits the budget, and measures that set once more. The model is left
    as it was: apply the plan with :meth:`CheckpointPlan.apply`.

    The budget is in the units of :func:`activation_memory`: bytes saved for the backward
    when the forward ends. The recomputation of one checkpointed module during the
    backward temporarily adds that module's own activations on top.

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
        predicate). Default: every child of an ``nn.Sequential`` or ``nn.ModuleList``,
        the usual "blocks". A candidate inside another candidate is dropped.
    example_kwargs : mapping, optional
        Keyword inputs of the forward.
    repeats : int, default 3
        Forward passes timed per candidate (the median is kept).

    Returns
    -------
    CheckpointPlan

    Raises
    ------
    TypeError
        If ``model`` is not a module or ``budget_bytes`` is not an int.
    ValueError
        If ``budget_bytes`` is negative, there is no candidate, or the budget is below
        what checkpointing every candidate reaches (the message gives that minimum).

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
    >>> plan.fits, plan.measured_bytes <= full // 2
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
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})

    def measure() -> int:
        return activation_memory(model, *args, **kwargs).total_bytes

    paths = _candidate_paths(model, targets)
    baseline = measure()
    savings = {}
    for path in paths:
        with _applied(model, [path]):
            savings[path] = baseline - measure()
    seconds = module_forward_seconds(model, paths, args, kwargs, repeats)
    candidates = tuple(CandidateCost(p, savings[p], seconds[p]) for p in paths)
    useful = [c for c in candidates if c.saved_bytes > 0]

    if baseline <= budget_bytes:
        return CheckpointPlan(
            budget_bytes, baseline, candidates, (), baseline, baseline, 0.0, "exact"
        )
    with _applied(model, [c.path for c in useful]):
        floor = measure()
    if floor > budget_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes} ({_mib(budget_bytes)}) is below the smallest "
            f"activation memory reachable by checkpointing the candidates: {floor} bytes "
            f"({_mib(floor)}) with all {len(useful)} useful candidates of {len(candidates)} "
            f"checkpointed (without checkpointing: {baseline} bytes). Raise the budget or "
            f"pass finer targets."
        )

    method = "exact" if len(useful) <= EXACT_MAX_CANDIDATES else "greedy"
    solve = _solve_exact if method == "exact" else _solve_greedy
    need = baseline - budget_bytes
    total_saving = sum(c.saved_bytes for c in useful)
    chosen: list[CandidateCost] = []
    measured = baseline
    for _ in range(_REPAIR_ROUNDS + 1):
        # Savings that do not add up (shared tensors) can leave the requirement above the
        # sum of the individual savings while all candidates together still fit.
        chosen = list(useful) if need >= total_saving else solve(useful, need)
        with _applied(model, [c.path for c in chosen]):
            measured = measure()
        if measured <= budget_bytes or len(chosen) == len(useful):
            break
        need += measured - budget_bytes
    order = {c.path: i for i, c in enumerate(candidates)}
    chosen.sort(key=lambda c: order[c.path])
    return CheckpointPlan(
        budget_bytes=budget_bytes,
        baseline_bytes=baseline,
        candidates=candidates,
        chosen=tuple(c.path for c in chosen),
        predicted_bytes=baseline - sum(c.saved_bytes for c in chosen),
        measured_bytes=measured,
        recompute_seconds=sum(c.forward_seconds for c in chosen),
        method=method,
    )


# --------------------------------------------------------------------------------------
# candidates
# --------------------------------------------------------------------------------------


def _default_targets(path: str, module: nn.Module, parents: dict[str, nn.Module]) -> bool:
    parent = parents.get(path)
    return isinstance(parent, (nn.Sequential, nn.ModuleList))


def _candidate_paths(model: nn.Module, targets: Targets | None) -> list[str]:
    if targets is None:
        parents = {}
        for path, module in model.named_modules():
            for name, _ in module.named_children():
                parents[f"{path}.{name}" if path else name] = module

        def targets(path: str, module: nn.Module) -> bool:
            return _default_targets(path, module, parents)

    # apply_checkpointing's selection (outermost wins), without changing the model.
    selected = _as_predicate(model, targets)
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
    """Checkpoint ``paths`` for the duration of a ``with`` block, then undo exactly that."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        modules = dict(model.named_modules())
        self.model = model
        self.paths = [p for p in paths if not is_checkpointed(modules[p])]
        self.modules = [modules[p] for p in self.paths]

    def __enter__(self) -> None:
        if self.paths:
            apply_checkpointing(self.model, self.paths)

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            _restore_forward(module)


# --------------------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------------------


def _solve_exact(items: list[CandidateCost], need: int) -> list[CandidateCost]:
    """Least total time whose savings reach ``need``: DP over Pareto-optimal states.

    A state is (saving capped at ``need``, time, chosen indices). A state is dropped when
    another has at least its saving for at most its time; every optimal solution extends
    a non-dominated state, so the result is exact.
    """
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for index, item in enumerate(items):
        extended = [
            (min(need, saving + item.saved_bytes), time + item.forward_seconds, (*chosen, index))
            for saving, time, chosen in states
        ]
        states = _pareto(states + extended)
    feasible = [s for s in states if s[0] >= need]
    best = min(feasible, key=lambda s: (s[1], len(s[2])))
    return [items[i] for i in best[2]]


def _pareto(
    states: list[tuple[int, float, tuple[int, ...]]],
) -> list[tuple[int, float, tuple[int, ...]]]:
    # Largest saving first; keep a state only if it is faster than every larger one.
    states.sort(key=lambda s: (-s[0], s[1], len(s[2])))
    front, best_time = [], float("inf")
    for state in states:
        if state[1] < best_time:
            front.append(state)
            best_time = state[1]
    return front


def _solve_greedy(items: list[CandidateCost], need: int) -> list[CandidateCost]:
    """Cheapest recompute time per byte saved first, then drop what is not needed."""
    ranked = sorted(items, key=lambda c: (c.forward_seconds / c.saved_bytes, -c.saved_bytes))
    chosen, total = [], 0
    for item in ranked:
        if total >= need:
            break
        chosen.append(item)
        total += item.saved_bytes
    for item in sorted(chosen, key=lambda c: -c.forward_seconds):
        if total - item.saved_bytes >= need:
            chosen.remove(item)
            total -= item.saved_bytes
    return chosen


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB"
