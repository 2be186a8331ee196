"""What the loss scaler records about skipped steps: history, and which gradients overflowed."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch

from finite.scaling._gradients import local_values, parameter_label

#: Largest finite float16 value; activations or gradients above it become inf.
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class ScaleRecord(NamedTuple):
    """One iteration of :attr:`LossScaler.history`.

    Attributes
    ----------
    step : int
        Iteration index: the number of :meth:`LossScaler.update` calls before this one.
    scale : float
        The loss scale the iteration's gradients were computed with.
    skipped : bool
        Whether an optimizer step was skipped in this iteration.
    reason : str or None
        ``None`` for a taken step; for a skipped one ``"inf"``, ``"nan"`` or ``"inf+nan"``
        (what this process found in its gradients), ``"other rank"`` when only another
        rank of the process group found non-finite gradients, or the ``veto_reason`` given
        to :meth:`LossScaler.step` (``"veto"`` by default, ``"spike"`` from a spike guard)
        when a veto skipped a step whose gradients were finite.
    """

    step: int
    scale: float
    skipped: bool
    reason: str | None


@dataclass(frozen=True)
class NonFiniteGradient:
    """A parameter whose gradient held inf or NaN at a skipped step."""

    name: str
    shape: tuple[int, ...]
    nan_count: int
    inf_count: int


@dataclass(frozen=True)
class OverflowReport:
    """The gradients that were non-finite at the last skipped step.

    Attributes
    ----------
    step : int
        Iteration index of the skipped step.
    scale : float
        Loss scale the gradients were computed with.
    gradients : tuple of NonFiniteGradient
        One entry per parameter with an inf or NaN gradient, in optimizer order.
        Empty when only another rank of the process group overflowed.
    """

    step: int
    scale: float
    gradients: tuple[NonFiniteGradient, ...]

    def __str__(self) -> str:
        lines = [f"step {self.step}, loss scale {self.scale:g}: non-finite gradients in"]
        lines += [
            f"  {g.name} {list(g.shape)}: {g.inf_count} inf, {g.nan_count} nan"
            for g in self.gradients
        ]
        if not self.gradients:
            lines.append("  no parameter of this process (another rank overflowed)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _CapturedGradient:
    param: weakref.ref[torch.Tensor]
    label: str
    shape: tuple[int, ...]
    nan_count: int
    inf_count: int


@dataclass(frozen=True)
class OverflowCapture:
    """Per-parameter inf/NaN counts taken when a skip is detected, before the grads are zeroed."""

    step: int
    scale: float
    gradients: tuple[_CapturedGradient, ...]

    @property
    def reason(self) -> str:
        has_inf = any(g.inf_count for g in self.gradients)
        has_nan = any(g.nan_count for g in self.gradients)
        if has_inf and has_nan:
            return "inf+nan"
        if has_inf or has_nan:
            return "inf" if has_inf else "nan"
        return "other rank"

    def merged(self, other: OverflowCapture) -> OverflowCapture:
        """This capture extended by another optimizer's capture from the same iteration."""
        return OverflowCapture(self.step, self.scale, self.gradients + other.gradients)

    def report(self, names: dict[int, str]) -> OverflowReport:
        """Resolve parameters to ``names`` (``id(param) -> name``); others keep their label."""
        entries = []
        for g in self.gradients:
            param = g.param()
            name = names.get(id(param), g.label) if param is not None else g.label
            entries.append(NonFiniteGradient(name, g.shape, g.nan_count, g.inf_count))
        return OverflowReport(self.step, self.scale, tuple(entries))


def capture_nonfinite(optimizer: torch.optim.Optimizer, step: int, scale: float) -> OverflowCapture:
    """Count inf and NaN in each gradient of ``optimizer`` (one host sync; skipped steps only)."""
    params, labels, counts = [], [], []
    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            grad = local_values(param.grad)
            params.append(param)
            labels.append(parameter_label(optimizer, group_index, index))
            counts.append(torch.stack((grad.isnan().sum(), grad.isinf().sum())))
    totals = torch.stack([c.to(counts[0].device) for c in counts]).tolist() if counts else []
    gradients = tuple(
        _CapturedGradient(weakref.ref(p), label, tuple(p.shape), nan, inf)
        for p, label, (nan, inf) in zip(params, labels, totals, strict=True)
        if nan or inf
    )
    return OverflowCapture(step, scale, gradients)


def min_scale_message(capture: OverflowCapture, patience: int) -> str:
    """Why the scaler gives up at its minimum scale, naming the overflowing parameters."""
    names = (
        ", ".join(f"{g.label} ({g.inf_count} inf, {g.nan_count} nan)" for g in capture.gradients)
        or "none on this rank (another rank of the process group overflowed)"
    )
    return (
        f"gradients were non-finite for {patience} consecutive steps with the loss scale at its "
        f"minimum ({capture.scale:g}), so lowering the scale further cannot help. "
        f"Non-finite gradients at step {capture.step}: {names}. Likely cause: forward "
        f"activations exceed the float16 range (|x| > {FLOAT16_MAX:g}); train in bfloat16 "
        "(torch.autocast(dtype=torch.bfloat16)) or keep the layers that overflow in float32. "
        "LossScaler.overflow_report(model) names the parameters by module path."
    )
