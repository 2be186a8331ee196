"""Floating-point formats: what each can hold, and what casting a tensor to one does.

:data:`FORMATS` and :func:`get_format` describe the formats of deep learning (float64
down to fp8) from their bit layouts; :func:`round_to` rounds a tensor to any of them,
including ones torch has no dtype for; :func:`cast_report` says which elements of a
tensor would overflow, underflow or lose precision in the cast.
"""

from finite.formats.float_format import FORMATS, FloatFormat, get_format
from finite.formats.report import CastReport, cast_report
from finite.formats.rounding import ROUNDING_MODES, round_to

__all__ = [
    "FORMATS",
    "ROUNDING_MODES",
    "CastReport",
    "FloatFormat",
    "cast_report",
    "get_format",
    "round_to",
]
