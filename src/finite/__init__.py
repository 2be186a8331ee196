"""finite: keep PyTorch training numerically healthy.

finite *prevents* numerical failures (stable ops, loss scaling, low-precision
weight updates, gradient clipping), *detects* them while training runs and
*diagnoses* them with a symptom, evidence, cause and fix.
"""

from finite import memory, ops
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
from finite.memory import (
    ActivationReport,
    CheckpointPlan,
    activation_memory,
    apply_checkpointing,
    checkpoint_sequential,
    linear_cross_entropy,
    plan_checkpointing,
)
from finite.monitor import History, Monitor, NonfiniteEvent, OpLocation, locate
from finite.precision import CompensatedOptimizer, MasterWeights, compensated
from finite.report import write_report
from finite.scaling import LossScaler, NonFiniteGradient, OverflowReport, ScalerConfig, ScaleRecord
from finite.step import StableStep, StepResult

__all__ = [
    "AGC",
    "FORMATS",
    "ActivationReport",
    "AutoClip",
    "CastReport",
    "CheckpointPlan",
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
    "StableStep",
    "StepResult",
    "ZClip",
    "__version__",
    "activation_memory",
    "apply_checkpointing",
    "cast_report",
    "checkpoint_sequential",
    "clip_grad_norm_",
    "clip_grad_value_",
    "compare_precision",
    "compensated",
    "diagnose",
    "get_format",
    "linear_cross_entropy",
    "locate",
    "memory",
    "ops",
    "plan_checkpointing",
    "print_findings",
    "round_to",
    "total_norm",
    "write_report",
]
