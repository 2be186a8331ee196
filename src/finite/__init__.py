"""finite: keep PyTorch training numerically healthy.

finite *prevents* numerical failures (stable ops, loss scaling, low-precision
weight updates, gradient clipping), *detects* them while training runs and
*diagnoses* them with a symptom, evidence, cause and fix.
"""

from finite import ops
from finite._version import __version__
# FORMATS-IMPORT

__all__ = [
    "FORMATS",
    "CastReport",
    "FloatFormat",
    "__version__",
    "cast_report",
    "get_format",
    "ops",
    "round_to",
]
