"""``finite doctor``: diagnose a training script with no change to it.

:func:`run_script` runs a script as ``__main__`` under global hooks
(:class:`Instrumentation`) that attach a :class:`finite.Monitor` to every model the script
trains, capture its loss, see its loss scaler and gradient clipping, and diagnose each
model when the script ends, however it ends. Under ``torchrun``,
:mod:`finite.doctor.distributed` brings every rank's results to rank 0.
"""

from finite.doctor.distributed import combine_reports, rank_disagreement
from finite.doctor.example import EXAMPLE, run_example
from finite.doctor.instrumentation import ClipRecord, Instrumentation, StopRun
from finite.doctor.session import ModelReport, RunResult, model_dirs, run_script, write_reports

__all__ = [
    "EXAMPLE",
    "ClipRecord",
    "Instrumentation",
    "ModelReport",
    "RunResult",
    "StopRun",
    "combine_reports",
    "model_dirs",
    "rank_disagreement",
    "run_example",
    "run_script",
    "write_reports",
]
