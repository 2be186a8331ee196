"""finite: keep PyTorch training numerically healthy.

finite *prevents* numerical failures (stable ops, loss scaling, low-precision
weight updates, gradient clipping), *detects* them while training runs and
*diagnoses* them with a symptom, evidence, cause and fix.
"""

from finite import ops
from finite._version import __version__
from finite.clipping import (
    AGC,
    AutoClip,
    ClipResult,
    SpikeGuard,
    SpikeRecord,
    ZClip,
    clip_grad_norm_,
    clip_grad_value_,
    total_norm,
)
from finite.diagnosis import (
    Evidence,
    Finding,
    PrecisionReport,
    compare_precision,
    diagnose,
    print_findings,
)
from finite.formats import FORMATS, CastReport, FloatFormat, cast_report, get_format, round_to
from finite.monitor import History, Monitor, NonfiniteEvent, OpLocation, locate
from finite.precision import CompensatedOptimizer, MasterWeights, compensated
from finite.report import write_report
from finite.scaling import LossScaler, NonFiniteGradient, OverflowReport, ScalerConfig, ScaleRecord

__all__ = [
    "AGC",
    "FORMATS",
    "AutoClip",
    "CastReport",
    "ClipResult",
    "CompensatedOptimizer",
    "Evidence",
    "Finding",
    "FloatFormat",
    "History",
    "LossScaler",
    "MasterWeights",
    "Monitor",
    "NonFiniteGradient",
    "NonfiniteEvent",
    "OpLocation",
    "OverflowReport",
    "PrecisionReport",
    "ScaleRecord",
    "ScalerConfig",
    "SpikeGuard",
    "SpikeRecord",
    "ZClip",
    "__version__",
    "cast_report",
    "clip_grad_norm_",
    "clip_grad_value_",
    "compare_precision",
    "compensated",
    "diagnose",
    "get_format",
    "locate",
    "ops",
    "print_findings",
    "round_to",
    "total_norm",
    "write_report",
]
