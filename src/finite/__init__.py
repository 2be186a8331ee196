"""finite: keep PyTorch training numerically healthy.

finite *prevents* numerical failures (stable ops, loss scaling, low-precision
weight updates, gradient clipping), *detects* them while training runs and
*diagnoses* them with a symptom, evidence, cause and fix.
"""

from finite import ops
from finite._version import __version__
from finite.formats import FORMATS, CastReport, FloatFormat, cast_report, get_format, round_to
from finite.precision import CompensatedOptimizer, MasterWeights, compensated
from finite.scaling import LossScaler, NonFiniteGradient, OverflowReport, ScalerConfig, ScaleRecord

__all__ = [
    "FORMATS",
    "CastReport",
    "CompensatedOptimizer",
    "FloatFormat",
    "LossScaler",
    "MasterWeights",
    "NonFiniteGradient",
    "OverflowReport",
    "ScaleRecord",
    "ScalerConfig",
    "__version__",
    "cast_report",
    "compensated",
    "get_format",
    "ops",
    "round_to",
]
