"""The unit of a diagnosis: one :class:`Finding` with the :class:`Evidence` behind it.

A finding reads as *symptom, evidence, cause, fix*: ``title`` names the symptom,
``evidence`` holds the numbers (with the step and module they were measured at, and
the report plot that shows them), ``cause`` says what most likely produced them and
``fix`` what to change. Both classes are frozen and turn into plain JSON-ready dicts
with ``to_dict()``; that dict is one entry of ``findings.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["PLOTS", "SEVERITIES", "Evidence", "Finding"]

#: Severities, most urgent first; findings sort in this order.
SEVERITIES: tuple[str, ...] = ("critical", "warning", "info")

#: Names of the report plots an :class:`Evidence` can point at.
PLOTS: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "grad_norm_heatmap",
    "histograms",
    "loss_scale",
    "update_ratio",
)


def _plain(value: Any) -> Any:
    """A JSON-safe Python number: numpy scalars unwrapped, inf and NaN as None (strict
    JSON has no token for them; the evidence text says the value)."""
    item = getattr(value, "item", None)
    if callable(item):
        value = item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class Evidence:
    """One measured fact behind a finding.

    Parameters
    ----------
    text : str
        The fact in words, with its number (``"grad norm 3.2e+04 at step 17"``).
    step : int, optional
        The training step the fact was measured at (the first one, for a range).
    module : str, optional
        Dotted module or parameter path (``"encoder.layers.0.linear1"``).
    value : float, optional
        The number itself, for machines (may be inf or NaN; ``to_dict`` writes those as
        None, since strict JSON cannot hold them).
    plot : str, optional
        The report plot that shows the fact; one of :data:`PLOTS`.
    """

    text: str
    step: int | None = None
    module: str | None = None
    value: float | None = None
    plot: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        if self.plot is not None and self.plot not in PLOTS:
            raise ValueError(f"plot must be one of {PLOTS} or None, got {self.plot!r}")
        if self.step is not None:
            object.__setattr__(self, "step", int(self.step))
        if self.value is not None:
            object.__setattr__(self, "value", float(self.value))

    def to_dict(self) -> dict[str, Any]:
        """The evidence as a JSON-ready dict with keys text, step, module, value, plot
        (``value`` is None when it is not finite)."""
        return {
            "text": self.text,
            "step": _plain(self.step),
            "module": self.module,
            "value": _plain(self.value),
            "plot": self.plot,
        }


@dataclass(frozen=True)
class Finding:
    """A diagnosed problem: symptom, evidence, cause, fix.

    Parameters
    ----------
    code : str
        Stable machine name of the rule that produced it (``"exploding_gradients"``).
    severity : {"critical", "warning", "info"}
        ``critical``: training is broken (non-finite values, divergence);
        ``warning``: training is hurt or about to be; ``info``: worth knowing.
    title : str
        The symptom in one line.
    evidence : tuple of Evidence
        The numbers behind it, with steps and module paths.
    cause : str
        The most likely mechanism.
    fix : str
        What to change, with concrete numbers where the history gives them.
    references : tuple of str
        Papers or documentation behind the rule.
    """

    code: str
    severity: str
    title: str
    evidence: tuple[Evidence, ...] = ()
    cause: str = ""
    fix: str = ""
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "evidence", tuple(self.evidence))
        object.__setattr__(self, "references", tuple(self.references))
        for item in self.evidence:
            if not isinstance(item, Evidence):
                raise TypeError(f"evidence items must be Evidence, got {type(item).__name__}")

    @property
    def first_step(self) -> int | None:
        """The earliest step any evidence names, or None when none does."""
        steps = [e.step for e in self.evidence if e.step is not None]
        return min(steps) if steps else None

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict; one entry of ``findings.json``."""
        return {
            "code": self.code,
            "severity": self.severity,
            "title": self.title,
            "evidence": [e.to_dict() for e in self.evidence],
            "cause": self.cause,
            "fix": self.fix,
            "references": list(self.references),
        }
