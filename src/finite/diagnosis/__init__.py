"""Diagnose: turn a training history into findings (symptom, evidence, cause, fix).

* :func:`diagnose`: run every rule of :mod:`finite.diagnosis.rules` over a
  :class:`~finite.monitor.History` (or a Monitor, or a ``history.jsonl`` file) and return
  :class:`Finding` s, most urgent first; :func:`print_findings` shows them with rich.
* :func:`compare_precision`: run one batch in float64, float32, bfloat16 and float16 and
  rank the modules by the error they add, to tell a precision problem from another one.

``docs/diagnosis.md`` describes every rule and its thresholds.
"""

from finite.diagnosis.compare_precision import (
    GradientError,
    ModuleError,
    PrecisionReport,
    compare_precision,
)
from finite.diagnosis.context import Context
from finite.diagnosis.diagnose import diagnose, load_history
from finite.diagnosis.finding import PLOTS, SEVERITIES, Evidence, Finding
from finite.diagnosis.rules import RULES
from finite.diagnosis.terminal import print_findings

__all__ = [
    "PLOTS",
    "RULES",
    "SEVERITIES",
    "Context",
    "Evidence",
    "Finding",
    "GradientError",
    "ModuleError",
    "PrecisionReport",
    "compare_precision",
    "diagnose",
    "load_history",
    "print_findings",
]
