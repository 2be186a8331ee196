"""The loss scaler's configuration: validated once, immutable afterwards."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from finite._checks import require_choice

STRATEGIES = ("backoff", "headroom")
ON_MIN_SCALE = ("raise", "warn")

_FLOAT32 = torch.finfo(torch.float32)


def _require_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _require_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _scale_value(value: object, name: str) -> float:
    """``value`` rounded to float32, the dtype the scale is held in."""
    number = _require_real(value, name)
    if not (math.isfinite(number) and _FLOAT32.tiny <= number <= _FLOAT32.max):
        raise ValueError(
            f"{name} must be a positive finite number within float32's normal range "
            f"[{_FLOAT32.tiny:g}, {_FLOAT32.max:g}]; got {value!r}"
        )
    return float(torch.tensor(number, dtype=torch.float32))


@dataclass(frozen=True)
class ScalerConfig:
    """Validated settings of a :class:`~finite.LossScaler` (see its docstring for each).

    ``init_scale``, ``min_scale`` and ``max_scale`` are stored rounded to float32, the dtype
    of the scale tensor, so comparisons with the running scale are exact.

    Raises
    ------
    TypeError
        If an argument has the wrong type (a bool where a number is expected, a float where
        an int is expected, a string that is not a choice, ...).
    ValueError
        If a value is out of range: ``growth_factor <= 1``, ``backoff_factor`` outside
        (0, 1), a non-finite or non-positive scale, ``not min_scale <= init_scale <=
        max_scale``, ``growth_interval``, ``hysteresis`` or ``patience`` below 1, a negative
        ``margin_bits`` or ``history_size``, an unknown ``strategy`` or ``on_min_scale``, or
        ``strategy="headroom"`` with ``dynamic=False``.
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    min_scale: float = 1.0
    max_scale: float = 2.0**24
    strategy: str = "backoff"
    margin_bits: int = 4
    on_min_scale: str = "raise"
    patience: int = 10
    dynamic: bool = True
    enabled: bool = True
    history_size: int = 1000

    def __post_init__(self) -> None:
        fields = {
            "init_scale": _scale_value(self.init_scale, "init_scale"),
            "min_scale": _scale_value(self.min_scale, "min_scale"),
            "max_scale": _scale_value(self.max_scale, "max_scale"),
            "growth_factor": _require_real(self.growth_factor, "growth_factor"),
            "backoff_factor": _require_real(self.backoff_factor, "backoff_factor"),
            "growth_interval": _require_int(self.growth_interval, "growth_interval", 1),
            "hysteresis": _require_int(self.hysteresis, "hysteresis", 1),
            "margin_bits": _require_int(self.margin_bits, "margin_bits", 0),
            "patience": _require_int(self.patience, "patience", 1),
            "history_size": _require_int(self.history_size, "history_size", 0),
        }
        if not (math.isfinite(fields["growth_factor"]) and fields["growth_factor"] > 1):
            raise ValueError(
                f"growth_factor must be a finite number > 1; got {self.growth_factor!r}"
            )
        if not 0 < fields["backoff_factor"] < 1:
            raise ValueError(
                f"backoff_factor must lie strictly between 0 and 1; got {self.backoff_factor!r}"
            )
        if not fields["min_scale"] <= fields["init_scale"] <= fields["max_scale"]:
            raise ValueError(
                "need min_scale <= init_scale <= max_scale; got "
                f"min_scale={self.min_scale!r}, init_scale={self.init_scale!r}, "
                f"max_scale={self.max_scale!r}"
            )
        for name in ("strategy", "on_min_scale"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        require_choice(self.strategy, STRATEGIES, "strategy")
        require_choice(self.on_min_scale, ON_MIN_SCALE, "on_min_scale")
        for name in ("dynamic", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.strategy == "headroom" and not self.dynamic:
            raise ValueError(
                "strategy='headroom' adapts the scale every step; it cannot be combined "
                "with dynamic=False"
            )
        for name, value in fields.items():
            object.__setattr__(self, name, value)
