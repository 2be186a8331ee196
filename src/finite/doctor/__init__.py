"""``finite doctor``: diagnose a training script with no change to it.

:func:`run_script` runs a script as ``__main__`` under global hooks
(:class:`Instrumentation`) that attach a :class:`finite.Monitor` to every model the script
trains, capture its loss, and diagnose each model when the script ends, however it ends.
"""

from finite.doctor.example import EXAMPLE, run_example
from finite.doctor.instrumentation import Instrumentation, StopRun
from finite.doctor.session import ModelReport, RunResult, model_dirs, run_script, write_reports

__all__ = [
    "EXAMPLE",
    "Instrumentation",
    "ModelReport",
    "RunResult",
    "StopRun",
    "model_dirs",
    "run_example",
    "run_script",
    "write_reports",
]
