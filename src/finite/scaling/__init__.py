"""Loss scaling for float16 training: :class:`LossScaler` and what it reports."""

from finite.scaling.config import ScalerConfig
from finite.scaling.loss_scaler import LossScaler
from finite.scaling.overflow import NonFiniteGradient, OverflowReport, ScaleRecord

__all__ = ["LossScaler", "NonFiniteGradient", "OverflowReport", "ScaleRecord", "ScalerConfig"]
