"""The built-in example: a float16 language model without loss scaling, then with the fix.

It is the lab's ``fp16-underflow`` scenario (:mod:`finite.lab.fp16_underflow`): a tiny
character-level transformer (:mod:`finite.lab.tiny_lm`) trained in float16 on a text that
ships with ``finite``, with the loss of a two-million-token batch. Without a loss scale
its per-token gradients fall below float16's smallest subnormal (2**-24) and flush to
zero, and the loss stalls above what a model that ignores context reaches; with
``finite.LossScaler`` (float32 ``finite.MasterWeights`` in both runs) it learns.
"""

from __future__ import annotations

from finite.lab import SCENARIOS, LabResult, run_scenario

__all__ = ["EXAMPLE", "run_example"]

#: Name of the lab scenario the example runs.
EXAMPLE = "fp16-underflow"


def run_example() -> LabResult:
    """Train the example broken and fixed, each diagnosed (about 10 s on one CPU core)."""
    return run_scenario(SCENARIOS[EXAMPLE])
