"""The built-in example: float16 training without loss scaling, then with the fix.

It is the lab's ``fp16-underflow`` scenario (:mod:`finite.lab.fp16_underflow`): a small
float16 MLP whose gradients fall below float16's smallest subnormal (2**-24) and flush to
zero, and the same run with ``finite.LossScaler`` on float32 ``finite.MasterWeights``.
"""

from __future__ import annotations

from finite.lab import SCENARIOS, LabResult, run_scenario

__all__ = ["EXAMPLE", "run_example"]

#: Name of the lab scenario the example runs.
EXAMPLE = "fp16-underflow"


def run_example() -> LabResult:
    """Train the example broken and fixed, each diagnosed (a few seconds on one CPU)."""
    return run_scenario(SCENARIOS[EXAMPLE])
