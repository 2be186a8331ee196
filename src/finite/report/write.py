"""``write_report``: a report directory with the page, the findings, the history and the plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from finite.diagnosis.finding import Finding
from finite.monitor.history import History
from finite.report.page import render_page
from finite.report.plots import make_plots, require_matplotlib

__all__ = ["FINDING_FIELDS", "write_report"]

#: Keys of every object in ``findings.json``, in order (the fields of ``Finding``).
FINDING_FIELDS = ("code", "severity", "title", "evidence", "cause", "fix", "references")


def write_report(
    history: History,
    findings: Iterable[Finding],
    out_dir: str | os.PathLike[str],
    precision_report: Any = None,
    *,
    clip_threshold: float | None = None,
) -> Path:
    """Write a numerical-health report of a run to ``out_dir``; return ``report.html``'s path.

    Files written (``out_dir`` and its parents are created):

    * ``report.html``: one self-contained page: the findings first, each piece of
      evidence linking to the plot that shows it, then the precision comparison (when
      given), the inf/NaN events, and the plots, embedded as ``data:`` URIs. No script,
      no address of any other resource: it opens offline.
    * ``findings.json``: a JSON list with one object per finding, keys
      ``code, severity, title, evidence, cause, fix, references`` (``Finding.to_dict()``).
      Strict JSON: a non-finite number is written as ``null``, as ``Finding.to_dict``
      does (the evidence ``text`` says what it was).
    * ``history.jsonl``: the history, as :meth:`History.to_jsonl` writes it
      (:meth:`History.from_jsonl` reads it back).
    * ``<plot>.png`` for each plot the history has data for: ``loss``, ``grad_norm``,
      ``grad_norm_heatmap``, ``histograms``, ``loss_scale``, ``update_ratio`` (the
      names of ``finite.diagnosis.PLOTS``). A plot without data is left out, the page
      says why, and a PNG of that name left by an earlier report is removed.

    ``report.html`` is written last: when it exists, the rest is complete.

    Parameters
    ----------
    history : History
        What the monitor recorded (``monitor.history`` or ``History.from_jsonl(path)``).
    findings : iterable of Finding
        Usually ``finite.diagnose(history)``; shown in the given order. Dicts with the
        ``Finding`` fields (entries of an earlier ``findings.json``) are accepted too.
    out_dir : str or os.PathLike
        Directory of the report.
    precision_report : PrecisionReport, optional
        The result of ``finite.compare_precision``: its verdict, the modules to keep in
        float32, a table of the dtypes and one of the modules that add most error.
    clip_threshold : float, optional
        Gradient-clipping threshold, drawn on the gradient-norm plot.

    Returns
    -------
    pathlib.Path
        Path of ``report.html``.

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install 'finite[plot]'``); nothing is
        written then.
    TypeError, ValueError
        For an argument of the wrong type or value, naming it.

    Examples
    --------
    >>> findings = finite.diagnose(monitor.history)          # doctest: +SKIP
    >>> write_report(monitor.history, findings, "runs/a/report")  # doctest: +SKIP
    PosixPath('runs/a/report/report.html')
    """
    if not isinstance(history, History):
        raise TypeError(f"history must be a finite.monitor.History, got {type(history).__name__}")
    finding_dicts = _finding_dicts(findings)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str or os.PathLike, got {type(out_dir).__name__}")
    if precision_report is not None and not callable(getattr(precision_report, "to_dict", None)):
        raise TypeError(
            "precision_report must be a PrecisionReport (from finite.compare_precision), "
            f"got {type(precision_report).__name__}"
        )
    if clip_threshold is not None:
        if isinstance(clip_threshold, bool) or not isinstance(clip_threshold, (int, float)):
            raise TypeError(
                f"clip_threshold must be a number or None, got {type(clip_threshold).__name__}"
            )
        if not (math.isfinite(clip_threshold) and clip_threshold > 0):
            raise ValueError(f"clip_threshold must be finite and > 0, got {clip_threshold!r}")
    require_matplotlib()  # before anything is written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(history, clip_threshold=clip_threshold)
    for plot in plots:
        path = out / plot.filename
        if plot.png is not None:
            path.write_bytes(plot.png)
        elif path.is_file():
            path.unlink()  # a stale image from an earlier report of this directory
    (out / "findings.json").write_text(
        json.dumps(_strict(finding_dicts), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    history.to_jsonl(out / "history.jsonl")
    page = render_page(
        findings=finding_dicts,
        plots=plots,
        summary=_summary(history, len(finding_dicts)),
        events=[str(event) for event in history.events],
        precision=precision_report,
    )
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report


def _finding_dicts(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    if isinstance(findings, (str, bytes, Mapping)) or not isinstance(findings, Iterable):
        raise TypeError(f"findings must be an iterable of Finding, got {type(findings).__name__}")
    out = []
    for index, finding in enumerate(findings):
        if isinstance(finding, Finding):
            data = finding.to_dict()
        elif isinstance(finding, Mapping):
            data = dict(finding)
            absent = [key for key in FINDING_FIELDS if key not in data]
            if absent:
                raise ValueError(f"findings[{index}] lacks the keys {absent}")
        else:
            raise TypeError(
                f"findings[{index}] must be a Finding or a dict, got {type(finding).__name__}"
            )
        out.append({key: data[key] for key in FINDING_FIELDS})
    return out


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats as None (as ``Evidence.to_dict`` writes them), so
    that strict JSON parsers read it."""
    if isinstance(value, Mapping):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summary(history: History, findings: int) -> list[str]:
    steps = history.steps
    facts = [f"format {history.format}" if history.format else "format unknown"]
    if len(steps):
        first, last = int(steps["step"].min()), int(steps["step"].max())
        facts.append(f"{_count(len(np.unique(steps['step'])), 'step')} ({first} to {last})")
        ranks = len(np.unique(steps["rank"]))
        if ranks > 1:
            facts.append(_count(ranks, "rank"))
    else:
        facts.append("no steps recorded")
    facts.append(_count(len(history.events), "inf/NaN event"))
    facts.append(_count(findings, "finding"))
    return facts


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
