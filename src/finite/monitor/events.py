"""What the monitor records when a value turns inf or NaN: :class:`NonfiniteEvent`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PHASES", "NonfiniteEvent", "TensorSummary"]

#: Where a non-finite value can first appear in a step.
PHASES = ("input", "forward", "backward")

#: Origin of a non-finite value made by code outside every monitored module: the loss
#: computed from the model's output.
LOSS_ORIGIN = "<loss>"


@dataclass(frozen=True)
class TensorSummary:
    """Summary of one tensor (or gradient) at a module boundary.

    Attributes
    ----------
    numel : int
        Number of elements.
    nonfinite : int
        Number of inf and NaN elements; -1 when the tensor has some but they were not
        counted (counts are taken for the model's inputs and for leaf-module outputs on
        measured steps; elsewhere only the min/max flag is, to keep the step cheap).
    min, max : float or None
        Smallest and largest element; NaN when the tensor holds a NaN; None when not
        measured (gradients carry only a flag).
    absmax : float or None
        ``max(|min|, |max|)``; NaN when the tensor holds a NaN, None when not measured.
    """

    numel: int
    nonfinite: int
    min: float | None
    max: float | None

    @property
    def absmax(self) -> float | None:
        if self.min is None or self.max is None:
            return None
        if math.isnan(self.min) or math.isnan(self.max):
            return math.nan
        return max(abs(self.min), abs(self.max))

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0

    def to_dict(self) -> dict[str, Any]:
        return {"numel": self.numel, "nonfinite": self.nonfinite, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSummary:
        low, high = data.get("min"), data.get("max")
        return cls(
            int(data["numel"]),
            int(data["nonfinite"]),
            None if low is None else float(low),
            None if high is None else float(high),
        )

    def __str__(self) -> str:
        count = "some" if self.nonfinite < 0 else str(self.nonfinite)
        text = f"{count}/{self.numel} non-finite"
        if self.min is not None and self.max is not None:
            text += f", min {self.min:.4g}, max {self.max:.4g}"
        return text


@dataclass(frozen=True)
class NonfiniteEvent:
    """Where inf/NaN first appeared in a step, and where it went from there.

    Attributes
    ----------
    step : int
        The monitor's step index.
    phase : {"input", "forward", "backward"}
        ``"input"``: a floating-point input of the model itself was non-finite (a data
        problem). ``"forward"``: the first module, in the order modules finished, whose
        inputs were all finite and whose output was not. ``"backward"``: the first module,
        in the order gradients arrived, whose incoming gradient (with respect to its
        outputs) was finite and whose outgoing gradient (with respect to its inputs, or its
        own parameters) was not.
    origin : str
        Module path as in ``model.named_modules()`` (``""`` is the model itself;
        ``"<loss>"`` is code outside the model that computed the loss from its output).
    origin_type : str
        Class name of the origin module (``"loss"`` for ``"<loss>"``, ``"input"`` for an
        input event).
    propagated : tuple of str
        Modules, in execution order, that received a non-finite value and passed one on:
        they are not to blame.
    inputs, outputs : tuple of TensorSummary
        Forward: the origin's floating-point inputs and outputs. Backward: its incoming
        gradients (with respect to its outputs) and outgoing ones (with respect to its
        inputs). Input events: the model's inputs and outputs.
    parameters : tuple of str
        Backward: parameters whose gradient held inf/NaN (all of the model's, not only the
        origin's). Empty for the other phases.
    rank : int
        Rank of the process that recorded the event (0 without ``torch.distributed``).
    """

    step: int
    phase: str
    origin: str
    origin_type: str
    propagated: tuple[str, ...] = ()
    inputs: tuple[TensorSummary, ...] = ()
    outputs: tuple[TensorSummary, ...] = ()
    parameters: tuple[str, ...] = ()
    rank: int = 0
    hint: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["propagated"] = list(self.propagated)
        data["parameters"] = list(self.parameters)
        data["inputs"] = [s.to_dict() for s in self.inputs]
        data["outputs"] = [s.to_dict() for s in self.outputs]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NonfiniteEvent:
        """Rebuild an event from :meth:`to_dict` (e.g. a ``history.jsonl`` line)."""
        return cls(
            step=int(data["step"]),
            phase=str(data["phase"]),
            origin=str(data["origin"]),
            origin_type=str(data["origin_type"]),
            propagated=tuple(data.get("propagated", ())),
            inputs=tuple(TensorSummary.from_dict(s) for s in data.get("inputs", ())),
            outputs=tuple(TensorSummary.from_dict(s) for s in data.get("outputs", ())),
            parameters=tuple(data.get("parameters", ())),
            rank=int(data.get("rank", 0)),
            hint=str(data.get("hint", "")),
        )

    def __str__(self) -> str:
        where = self.origin if self.origin else "the model itself"
        if self.phase == "input":
            lines = [f"step {self.step}: non-finite values in the model's input (a data problem)"]
        else:
            lines = [
                f"step {self.step}: {self.phase} pass made inf/NaN first in "
                f"{where!r} ({self.origin_type})"
            ]
        if self.rank:
            lines[0] += f" on rank {self.rank}"
        for label, summaries in (("in", self.inputs), ("out", self.outputs)):
            for i, summary in enumerate(summaries):
                lines.append(f"  {label}[{i}]: {summary}")
        if self.propagated:
            shown = ", ".join(self.propagated[:8])
            more = f" and {len(self.propagated) - 8} more" if len(self.propagated) > 8 else ""
            lines.append(f"  passed on by: {shown}{more}")
        if self.parameters:
            lines.append(f"  parameters with non-finite gradients: {', '.join(self.parameters)}")
        if self.hint:
            lines.append(f"  {self.hint}")
        return "\n".join(lines)
