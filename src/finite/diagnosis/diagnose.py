"""``diagnose``: run every rule over a history and sort what they find."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from finite.diagnosis.context import Context, build_context
from finite.diagnosis.finding import SEVERITIES, Finding
from finite.diagnosis.rules import RULES
from finite.monitor import History, Monitor

__all__ = ["Rule", "diagnose", "load_history"]

Rule = Callable[[History, Context], "Finding | None"]


def load_history(source: History | Monitor | str | os.PathLike[str]) -> History:
    """The :class:`History` behind ``source``.

    A Monitor gives its (synced) history; a path to a ``history.jsonl`` file is read with
    :meth:`History.from_jsonl`; a directory (a monitor's ``log_dir``) reads its
    ``history.jsonl`` and ``history.rank*.jsonl`` files.
    """
    if isinstance(source, History):
        return source
    if isinstance(source, Monitor):
        return source.history
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("history*.jsonl"))
            if not files:
                raise FileNotFoundError(f"source={str(source)!r}: no history*.jsonl in it")
            return History.from_jsonl(*files)
        if not path.exists():
            raise FileNotFoundError(f"source={str(source)!r} does not exist")
        return History.from_jsonl(path)
    raise TypeError(
        "source must be a finite.monitor.Monitor, a History or a path to a history.jsonl "
        f"file, got {type(source).__name__}"
    )


def _sort_key(finding: Finding, priority: int) -> tuple[int, float, int]:
    step = finding.first_step
    return (
        SEVERITIES.index(finding.severity),
        math.inf if step is None else float(step),
        priority,
    )


def diagnose(
    source: History | Monitor | str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    lost_update_fraction: float | None = None,
    rules: Sequence[Rule] | None = None,
) -> list[Finding]:
    """Diagnose a monitored run: a list of :class:`Finding`, most urgent first.

    Every rule of :data:`finite.diagnosis.rules.RULES` reads the history (and the few
    facts the history does not record, see :class:`Context`) and returns a finding or
    None. Findings are sorted by severity (critical, warning, info), then by the first
    step their evidence names, then by the rules' order of priority.

    Parameters
    ----------
    source : Monitor, History, str or PathLike
        A :class:`~finite.monitor.Monitor` (its history, and its model, optimizer and
        scaler), a :class:`~finite.monitor.History`, or a path to a ``history.jsonl`` file
        or to the monitor's ``log_dir``.
    model : torch.nn.Module, optional
        Gives the dtype each weight is stored in (a bfloat16 weight loses small updates, a
        float32 master weight does not). Taken from a Monitor when not given.
    optimizer : torch.optim.Optimizer, optional
        Gives the learning rate quoted in fixes, and the swamping meter of a
        :func:`finite.compensated` optimizer. Taken from a Monitor when not given.
    scaler : LossScaler, optional
        Gives the minimum loss scale and the last overflow report. Taken from a Monitor
        when not given.
    lost_update_fraction : float, optional
        ``compensated(...).stats()["lost_update_fraction"]``, if measured elsewhere.
    rules : sequence of callables, optional
        Rules to run instead of all of them; each ``(history, context) -> Finding | None``.

    Returns
    -------
    list of Finding

    Raises
    ------
    TypeError
        If ``source`` is none of the above, or a rule returns something else than a
        Finding or None.
    FileNotFoundError
        If a path does not exist.

    Examples
    --------
    >>> from finite.monitor import History
    >>> history = History("float32")
    >>> history.extend({"step": i, "loss": 1.0 / (i + 1), "grad_norm": 1.0,
    ...                 "nonfinite_grads": 0} for i in range(50))
    >>> diagnose(history)
    []
    """
    history = load_history(source)
    if isinstance(source, Monitor):
        model = model if model is not None else source.model
        optimizer = optimizer if optimizer is not None else source.optimizer
        scaler = scaler if scaler is not None else source.scaler
    context = build_context(
        history.format,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        lost_update_fraction=lost_update_fraction,
    )
    chosen = RULES if rules is None else tuple(rules)
    findings: list[tuple[Finding, int]] = []
    for priority, rule in enumerate(chosen):
        if not callable(rule):
            raise TypeError(f"rules must hold callables, got {type(rule).__name__}")
        finding = rule(history, context)
        if finding is None:
            continue
        if not isinstance(finding, Finding):
            raise TypeError(
                f"rule {getattr(rule, '__name__', rule)!r} returned "
                f"{type(finding).__name__}, expected a Finding or None"
            )
        findings.append((finding, priority))
    findings.sort(key=lambda item: _sort_key(*item))
    return [finding for finding, _ in findings]
