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

import numpy as np

from finite.diagnosis import Evidence, Finding, diagnose
from finite.doctor.instrumentation import ClipRecord, Instrumentation, StopRun
from finite.monitor import History

__all__ = [
    "ModelReport",
    "RunResult",
    "clipping_finding",
    "loss_scaling_finding",
    "model_dirs",
    "run_script",
    "write_reports",
]

#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


@dataclass
class ModelReport:
    """What the doctor found for one model of the script.

    ``clip_threshold`` is the ``max_norm`` the script gave ``clip_grad_norm_`` for this
    model (drawn on the report's gradient-norm plot), None when it did not clip.
    """

    name: str
    history: History
    findings: list[Finding]
    clip_threshold: float | None = None


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
    instrumentation.finish()
    reports = _diagnose_all(instrumentation)
    return RunResult(status, ended, instrumentation.optimizer_steps, reports)


def _diagnose_all(instrumentation: Instrumentation) -> list[ModelReport]:
    reports: list[ModelReport] = []
    for monitor in instrumentation.monitors:
        try:
            monitor.close()
        except FloatingPointError:
            pass  # on_nonfinite="raise" re-raising at the final step: the script saw it
        names = [r.name for r in reports]
        name = type(monitor.model).__name__
        if name in names:
            name = f"{name}-{names.count(name) + 1}"
        findings = list(diagnose(monitor))
        if monitor.scaler is not None:
            scaling = loss_scaling_finding(monitor.history, type(monitor.scaler).__name__)
            if scaling is not None:
                findings.append(scaling)
        clip = instrumentation.clipping(monitor)
        if clip is not None:
            findings.append(clipping_finding(clip))
        threshold = clip.max_norm if clip is not None else None
        reports.append(ModelReport(name, monitor.history, findings, threshold))
    return reports


def _power_of_two(value: float) -> str:
    exponent = math.log2(value) if value > 0 and math.isfinite(value) else math.nan
    if math.isfinite(exponent) and exponent == round(exponent):
        return f"{value:.3g} (2^{int(exponent)})"
    return f"{value:.3g}"


def loss_scaling_finding(history: History, scaler_name: str) -> Finding | None:
    """An "info" finding: the loss scale over the run and the steps the scaler skipped.

    None when the history holds no loss scale (the scaler was disabled).
    """
    steps = history.steps
    if len(steps) == 0:
        return None
    rows = steps.where(rank=int(steps["rank"].min()))
    scale = rows["loss_scale"].astype(float)
    known = np.isfinite(scale)
    if not known.any():
        return None
    step, scale = rows["step"][known], scale[known]
    skipped = [int(s) for s in rows["step"][rows["skipped"].astype(bool)]]
    shown = ", ".join(str(s) for s in skipped[:8]) + (" ..." if len(skipped) > 8 else "")
    evidence = [
        Evidence(
            f"loss scale {_power_of_two(float(scale[0]))} at step {int(step[0])}, "
            f"{_power_of_two(float(scale[-1]))} at step {int(step[-1])}",
            step=int(step[0]),
            value=float(scale[-1]),
            plot="loss_scale",
        )
    ]
    if skipped:
        evidence.append(
            Evidence(
                f"skipped step(s) (inf/NaN gradients, optimizer.step() not run): {shown}",
                step=skipped[0],
                value=float(len(skipped)),
                plot="loss_scale",
            )
        )
    return Finding(
        code="loss_scaling",
        severity="info",
        title=f"{scaler_name} skipped {len(skipped)} of {len(rows)} steps",
        evidence=tuple(evidence),
        cause=(
            "The loss scaler multiplies the loss before backward() so that small "
            "gradients do not flush to zero in float16, and skips a step whose gradients "
            "overflow, lowering the scale. The report's gradient norms are unscaled."
        ),
        fix=(
            "Nothing to fix while skips are few and early (the scale settling). Steps "
            "skipped all along are reported as a loss_scale_collapse finding."
        ),
    )


def clipping_finding(clip: ClipRecord) -> Finding:
    """An "info" finding: how often ``clip_grad_norm_`` cut the gradient norm."""
    clipped = int(clip.clipped.cpu())  # one read, after the run
    share = clipped / clip.calls if clip.calls else 0.0
    return Finding(
        code="gradient_clipping",
        severity="info",
        title=(
            f"clip_grad_norm_(max_norm={clip.max_norm:g}) clipped the gradient norm "
            f"on {clipped} of {clip.calls} calls"
        ),
        evidence=(
            Evidence(
                f"the gradient norm before clipping exceeded {clip.max_norm:g} "
                f"(or was not finite) on {clipped} of {clip.calls} calls ({share:.0%})",
                value=clip.max_norm,
                plot="grad_norm",
            ),
        ),
        cause=(
            "The script clips with torch.nn.utils.clip_grad_norm_; the report's "
            "gradient norm is the norm before clipping (unscaled when a loss scaler is "
            "used), drawn against the threshold."
        ),
        fix=(
            "Nothing to fix by itself. Clipping on nearly every step means the threshold "
            "sets the step size: raise it or lower the learning rate; finite.ZClip and "
            "finite.AutoClip adapt it to the run."
        ),
    )


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

            write_report(
                report.history, report.findings, directory, clip_threshold=report.clip_threshold
            )
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
