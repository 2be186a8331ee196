"""The lab: small reproducible training runs, each with one planted numerical fault.

Each scenario is one module in this package: a tiny model, seeded synthetic data, the
fault, the fix and the finding code :func:`finite.diagnose` should name. ``run_scenario``
trains it broken and fixed under a :class:`finite.Monitor` and compares the diagnosis
with what was planted; ``finite lab`` runs them from the command line.

>>> from finite.lab import SCENARIOS, run_scenario
>>> result = run_scenario(SCENARIOS["softmax-overflow"])
>>> result.broken.first_nonfinite_step, result.found[0], result.match
(0, 'nonfinite_loss', True)
"""

from finite.lab._scenario import LabResult, Outcome, Scenario, run_scenario
from finite.lab.registry import SCENARIOS, get_scenario

__all__ = ["SCENARIOS", "LabResult", "Outcome", "Scenario", "get_scenario", "run_scenario"]
