"""Run a user's script under the doctor's instrumentation, then diagnose and report."""

from __future__ import annotations

import json
import math
import os
import runpy
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finite.diagnosis import Finding, diagnose
from finite.doctor.instrumentation import Instrumentation, StopRun
from finite.monitor import History, Monitor

__all__ = ["ModelReport", "RunResult", "model_dirs", "run_script", "write_reports"]

#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


@dataclass
class ModelReport:
    """What the doctor found for one model of the script."""

    name: str
    history: History
    findings: list[Finding]


@dataclass
class RunResult:
    """How the script ended and what each of its models' monitors recorded."""

    exit_status: int
    ended: str  # "finished", "exit", "exception", "interrupted", "max-steps"
    optimizer_steps: int
    reports: list[ModelReport] = field(default_factory=list)


def _exit_status(code: Any) -> int:
    """The status ``sys.exit(code)`` gives the interpreter."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_script(
    script: str | os.PathLike[str],
    args: list[str],
    *,
    monitor_kwargs: dict[str, Any] | None = None,
    max_steps: int | None = None,
) -> RunResult:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]``, instrumented.

    The script's directory goes first on ``sys.path`` (as ``python script.py`` does);
    ``sys.argv`` and ``sys.path`` are restored afterwards. Whatever way the script ends,
    every hook is removed, the monitors are closed and diagnosed.

    Returns
    -------
    RunResult
        ``exit_status``: 0 when the script finished or ``max_steps`` stopped it, the code
        of a ``SystemExit``, 1 for an uncaught exception (its traceback is printed to
        standard error), 130 for ``KeyboardInterrupt``.
    """
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"script not found: {str(script)!r}")
    instrumentation = Instrumentation(monitor_kwargs or {}, max_steps=max_steps)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(path.resolve().parent))
    status, ended = 0, "finished"
    try:
        instrumentation.install()
        runpy.run_path(str(path), run_name="__main__")
    except StopRun:
        ended = "max-steps"
    except SystemExit as exc:
        status, ended = _exit_status(exc.code), "exit"
    except KeyboardInterrupt:
        print("finite doctor: interrupted", file=sys.stderr)
        status, ended = EXIT_INTERRUPTED, "interrupted"
    except BaseException:  # the script's own error: report it, then diagnose
        traceback.print_exc()
        status, ended = 1, "exception"
    finally:
        instrumentation.remove()
        sys.argv, sys.path[:] = saved_argv, saved_path
    reports = _diagnose_all(instrumentation.monitors)
    return RunResult(status, ended, instrumentation.optimizer_steps, reports)


def _diagnose_all(monitors: list[Monitor]) -> list[ModelReport]:
    reports = []
    for monitor in monitors:
        try:
            monitor.close()
        except FloatingPointError:
            pass  # on_nonfinite="raise" re-raising at the final step: the script saw it
        names = [r.name for r in reports]
        name = type(monitor.model).__name__
        if name in names:
            name = f"{name}-{names.count(name) + 1}"
        reports.append(ModelReport(name, monitor.history, list(diagnose(monitor))))
    return reports


def model_dirs(reports: list[ModelReport], out_dir: Path) -> list[Path]:
    """``out_dir`` for one model; ``out_dir/<i>-<ClassName>`` each when there are several."""
    if len(reports) == 1:
        return [out_dir]
    return [out_dir / f"{i}-{report.name}" for i, report in enumerate(reports)]


def write_reports(reports: list[ModelReport], out_dir: Path, *, html: bool = True) -> list[Path]:
    """Write each model's report; return the directories written.

    With ``html``: :func:`finite.write_report` (``report.html``, ``findings.json``,
    ``history.jsonl``, plots). Without: ``findings.json`` and ``history.jsonl`` only.
    """
    dirs = model_dirs(reports, out_dir)
    for report, directory in zip(reports, dirs, strict=True):
        if html:
            from finite.report import write_report

            write_report(report.history, report.findings, directory)
            continue
        directory.mkdir(parents=True, exist_ok=True)
        findings = [_strict(f.to_dict()) for f in report.findings]
        (directory / "findings.json").write_text(
            json.dumps(findings, indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        report.history.to_jsonl(directory / "history.jsonl")
    return dirs


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats as None, as ``findings.json`` is strict JSON."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
