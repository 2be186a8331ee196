"""What the rules know besides the history: :class:`Context`.

The :class:`~finite.monitor.History` records what the monitor measured. A few numbers a
rule can use live elsewhere: the loss scaler's minimum scale and its last overflow report,
the dtype each weight is stored in (a bfloat16 weight swamps small updates, a float32
master weight does not), the learning rate, and the swamping meter of
:func:`finite.compensated`. :func:`diagnose` fills a :class:`Context` from the
``Monitor`` (or the objects passed to it); every field may be missing and every rule
works without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from finite.formats import FloatFormat, get_format

__all__ = ["Context", "build_context"]


@dataclass(frozen=True)
class Context:
    """Facts about a run that its history does not record.

    Attributes
    ----------
    format : FloatFormat or None
        The format the monitor measured against (``history.format``).
    weight_formats : mapping of str to FloatFormat
        Storage format of each parameter, by name as in ``model.named_parameters()``;
        empty when the model is unknown.
    min_loss_scale : float or None
        The loss scaler's ``min_scale``; None without a scaler.
    overflow_report : OverflowReport or None
        ``LossScaler.overflow_report(model)``: the parameters whose gradients overflowed
        at the last skipped step.
    learning_rate : float or None
        The first parameter group's learning rate at the end of the run.
    lost_update_fraction : float or None
        ``compensated(...).stats()["lost_update_fraction"]``: the share of float16/bfloat16
        weight updates plain rounding would have discarded.
    compensation : str or None
        ``"kahan"`` or ``"stochastic"`` when the optimizer is a
        :class:`~finite.CompensatedOptimizer` (the lost updates are being recovered).
    """

    format: FloatFormat | None = None
    weight_formats: Mapping[str, FloatFormat] = field(default_factory=lambda: MappingProxyType({}))
    min_loss_scale: float | None = None
    overflow_report: Any = None
    learning_rate: float | None = None
    lost_update_fraction: float | None = None
    compensation: str | None = None


def _weight_formats(model: torch.nn.Module | None) -> Mapping[str, FloatFormat]:
    if model is None:
        return MappingProxyType({})
    formats = {}
    for name, p in model.named_parameters():
        if p.is_floating_point():
            try:
                formats[name] = get_format(p.dtype)
            except ValueError:
                continue
    return MappingProxyType(formats)


def build_context(
    format_name: str | None,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    lost_update_fraction: float | None = None,
) -> Context:
    """A :class:`Context` from the run's objects; each may be None.

    Reads the scaler's configuration and overflow report, the optimizer's learning rate
    and, for a :class:`~finite.CompensatedOptimizer`, its swamping meter (which
    synchronises once).
    """
    fmt = get_format(format_name) if format_name else None
    min_scale = None
    report = None
    if scaler is not None:
        config = getattr(scaler, "config", None)
        min_scale = getattr(config, "min_scale", None)
        overflow_report = getattr(scaler, "overflow_report", None)
        if callable(overflow_report):
            report = overflow_report(model) if model is not None else overflow_report()
    learning_rate = None
    compensation = None
    if optimizer is not None:
        groups = getattr(optimizer, "param_groups", None) or []
        if groups and isinstance(groups[0].get("lr"), (int, float, torch.Tensor)):
            learning_rate = float(groups[0]["lr"])
        stats = getattr(optimizer, "stats", None)
        method = getattr(optimizer, "method", None)
        if callable(stats) and isinstance(method, str):
            compensation = method
            if lost_update_fraction is None:
                measured = stats().get("lost_update_fraction")
                if measured is not None and not math.isnan(measured):
                    lost_update_fraction = float(measured)
    if lost_update_fraction is not None:
        if isinstance(lost_update_fraction, bool) or not isinstance(
            lost_update_fraction, (int, float)
        ):
            raise TypeError(
                "lost_update_fraction must be a float in [0, 1] or None, "
                f"got {type(lost_update_fraction).__name__}"
            )
        if not 0.0 <= lost_update_fraction <= 1.0:
            raise ValueError(
                f"lost_update_fraction must be in [0, 1], got {lost_update_fraction!r}"
            )
        lost_update_fraction = float(lost_update_fraction)
    return Context(
        format=fmt,
        weight_formats=_weight_formats(model),
        min_loss_scale=None if min_scale is None else float(min_scale),
        overflow_report=report,
        learning_rate=learning_rate,
        lost_update_fraction=lost_update_fraction,
        compensation=compensation,
    )
