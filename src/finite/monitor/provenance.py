"""Which module made a NaN/Inf, from per-tensor flags recorded during a step.

The monitor gives every distinct floating-point tensor that crosses a module boundary
(an input or output of a monitored module) a *slot*, summarises it once on the device,
and records each module call as the slots it read and wrote, in the order calls
finished. In the backward pass it summarises the gradient of each slot as it arrives.
This module reads those summaries on the host and names the origin:

* **forward**: the first call, in the order calls finished, whose inputs are all finite
  and some output is not. Calls finish children-first, so the innermost module that
  turned finite values into non-finite ones comes first; its enclosing modules, which
  also see finite inputs and a non-finite output, come later and are not blamed.
* **backward**: the first call, in the order gradients arrived, whose incoming gradients
  (with respect to its outputs) are finite and whose outgoing gradient (with respect to
  an input, or one of its own parameters) is not; ties go to the innermost module.
* **input**: a floating-point input of the model itself is non-finite.

Calls that received a non-finite value and produced one are listed as *propagated*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Call", "backward_origin", "forward_origin"]


@dataclass(frozen=True)
class Call:
    """One forward call of a module: the slots it read and the slots it wrote."""

    module: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Origin:
    """Result of an analysis: index of the origin call (None if none) and propagators."""

    call: int | None
    propagated: tuple[int, ...]


def forward_origin(calls: Sequence[Call], bad: Sequence[bool] | np.ndarray) -> Origin:
    """The forward origin among ``calls`` given which slots hold inf/NaN (``bad``)."""
    origin = None
    propagated = []
    for i, call in enumerate(calls):
        inputs_bad = any(bad[s] for s in call.inputs)
        outputs_bad = any(bad[s] for s in call.outputs)
        if outputs_bad and not inputs_bad and origin is None:
            origin = i
        elif outputs_bad and inputs_bad:
            propagated.append(i)
    return Origin(origin, tuple(propagated))


def backward_origin(
    calls: Sequence[Call],
    grad_bad: Mapping[int, bool],
    grad_order: Mapping[int, int],
    params_bad: Sequence[bool],
    depth: Sequence[int],
) -> Origin:
    """The backward origin among ``calls``.

    Parameters
    ----------
    calls : sequence of Call
        Forward calls, in the order they finished.
    grad_bad : mapping
        Slot -> whether its gradient held inf/NaN, for the slots that received one.
    grad_order : mapping
        Slot -> position of its gradient in arrival order.
    params_bad : sequence of bool
        Per module: whether one of its own (directly registered) parameters has a
        non-finite gradient.
    depth : sequence of int
        Per module: its depth in the module tree (the model is 0).
    """
    candidates: list[tuple[float, int, int]] = []
    propagated: list[tuple[int, int]] = []
    for i, call in enumerate(calls):
        incoming_bad = [s for s in call.outputs if grad_bad.get(s, False)]
        outgoing_bad = [s for s in call.inputs if grad_bad.get(s, False)]
        if incoming_bad:
            if outgoing_bad or params_bad[call.module]:
                propagated.append((min(grad_order[s] for s in incoming_bad), i))
            continue
        arrival: float
        if outgoing_bad:
            arrival = float(min(grad_order[s] for s in outgoing_bad))
        elif params_bad[call.module]:
            # Parameter gradients carry no arrival order: after every slot gradient.
            arrival = math.inf
        else:
            continue
        candidates.append((arrival, -depth[call.module], i))
    origin = min(candidates)[2] if candidates else None
    return Origin(origin, tuple(i for _, i in sorted(propagated)))
