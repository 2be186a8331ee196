"""What a lab scenario is, and what running one gives back."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import ModuleType

import torch

from finite.diagnosis import Finding, diagnose
from finite.monitor import History, Monitor

#: Severities a fixed run may reach and still count as healthy.
HEALTHY_SEVERITIES = (None, "info")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One planted numerical fault and its fix.

    Attributes
    ----------
    name : str
        Command-line name (``"softmax-overflow"``).
    fault : str
        The fault in one line.
    fix : str
        The fix in one line.
    expected : str
        The finding code :func:`finite.diagnose` should put first for the broken run.
    train : callable
        ``train(fixed: bool) -> Monitor``: seeded, deterministic training run; the
        returned monitor is closed and holds the run's history.
    """

    name: str
    fault: str
    fix: str
    expected: str
    train: Callable[[bool], Monitor]

    @classmethod
    def from_module(cls, module: ModuleType) -> Scenario:
        return cls(module.NAME, module.FAULT, module.FIX, module.EXPECTED, module.train)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one run (broken or fixed) ended and what the doctor said about it.

    Attributes
    ----------
    steps : int
        Steps trained.
    first_loss, final_loss : float
        Loss at the first and last step (NaN or inf when it was not finite).
    first_nonfinite_step : int or None
        First step whose loss or gradients held inf/NaN; None when there was none.
    findings : tuple of str
        Finding codes from :func:`finite.diagnose`, most severe first.
    worst_severity : str or None
        Severity of the first finding; None when there were no findings.
    """

    steps: int
    first_loss: float
    final_loss: float
    first_nonfinite_step: int | None
    findings: tuple[str, ...]
    worst_severity: str | None

    @property
    def healthy(self) -> bool:
        """No finding above "info"."""
        return self.worst_severity in HEALTHY_SEVERITIES


@dataclasses.dataclass(frozen=True)
class LabResult:
    """Broken and fixed outcome of one scenario, and whether the doctor got it right.

    ``match`` is true when the broken run's first finding is the expected one and the
    fixed run has nothing above "info".
    """

    name: str
    fault: str
    fix: str
    expected: str
    broken: Outcome
    fixed: Outcome
    found: tuple[str, ...]
    match: bool
    broken_history: History = dataclasses.field(repr=False, compare=False)
    fixed_history: History = dataclasses.field(repr=False, compare=False)
    broken_findings: tuple[Finding, ...] = dataclasses.field(repr=False, compare=False)
    fixed_findings: tuple[Finding, ...] = dataclasses.field(repr=False, compare=False)

    def record(self) -> dict:
        """The plain record (no histories): what ``finite lab --json`` prints."""
        return {
            "name": self.name,
            "fault": self.fault,
            "fix": self.fix,
            "broken": dataclasses.asdict(self.broken),
            "fixed": dataclasses.asdict(self.fixed),
            "expected": self.expected,
            "found": list(self.found),
            "match": self.match,
        }


def run_scenario(scenario: Scenario) -> LabResult:
    """Train ``scenario`` broken and fixed, diagnose both, and compare with what was planted.

    Runs on one CPU thread (tiny models are fastest there, and the result does not depend
    on the size of the thread pool); the thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        broken_monitor = scenario.train(False)
        fixed_monitor = scenario.train(True)
    finally:
        torch.set_num_threads(threads)
    broken_findings = tuple(diagnose(broken_monitor))
    fixed_findings = tuple(diagnose(fixed_monitor))
    broken = _outcome(broken_monitor.history, broken_findings)
    fixed = _outcome(fixed_monitor.history, fixed_findings)
    match = bool(broken.findings) and broken.findings[0] == scenario.expected and fixed.healthy
    return LabResult(
        name=scenario.name,
        fault=scenario.fault,
        fix=scenario.fix,
        expected=scenario.expected,
        broken=broken,
        fixed=fixed,
        found=broken.findings,
        match=match,
        broken_history=broken_monitor.history,
        fixed_history=fixed_monitor.history,
        broken_findings=broken_findings,
        fixed_findings=fixed_findings,
    )


def _outcome(history: History, findings: tuple[Finding, ...]) -> Outcome:
    steps = history.steps
    losses = [float(v) for v in steps["loss"]]
    bad_grads = [int(v) for v in steps["nonfinite_grads"]]
    step_numbers = [int(v) for v in steps["step"]]
    first_nonfinite = next(
        (
            step
            for step, loss, grads in zip(step_numbers, losses, bad_grads, strict=True)
            if not math.isfinite(loss) or grads > 0
        ),
        None,
    )
    return Outcome(
        steps=len(losses),
        first_loss=losses[0] if losses else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        first_nonfinite_step=first_nonfinite,
        findings=tuple(f.code for f in findings),
        worst_severity=findings[0].severity if findings else None,
    )
