"""Rules for inf/NaN: in the data, the loss, the gradients and the weights.

The monitor's :class:`~finite.monitor.NonfiniteEvent` names the module where a
non-finite value first appeared; these rules add what the value itself says about the
mechanism (``+inf`` from an overflow, ``-inf`` from ``log(0)``, NaN from ``0/0``) and what
the steps before it say (values that grew step by step until they overflowed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from finite.diagnosis.context import Context
from finite.diagnosis.finding import Evidence, Finding
from finite.diagnosis.rules._series import (
    by_name,
    events_at,
    growth_before,
    loss_nonfinite,
    num,
    skipped_steps,
    step_rows,
)
from finite.formats import FloatFormat
from finite.monitor import History, NonfiniteEvent, TensorSummary

__all__ = [
    "EXPLOSION_GROWTH",
    "Mechanism",
    "mechanism",
    "nonfinite_gradients",
    "nonfinite_input_data",
    "nonfinite_loss",
    "nonfinite_weights",
]

#: The loss or gradient norm growing this many times over the median of the steps before a
#: non-finite value means the values grew until they overflowed (an explosion).
EXPLOSION_GROWTH = 100.0

_LOCATE = (
    "To name the exact operation and source line, re-run the failing step under "
    "finite.locate(step_fn, batch)."
)


class Mechanism:
    """Likely mechanisms of a non-finite value, with the fix each calls for."""

    EXPLOSION = "explosion"
    EXP_OVERFLOW = "exp overflow"
    OVERFLOW = "overflow"
    LOG_ZERO = "log of 0"
    DIV_ZERO = "division by 0"
    NAN = "0/0"
    DATA = "non-finite input data"
    UNKNOWN = "unknown"

    CAUSES: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            EXPLOSION: (
                "values grew step by step until they overflowed: an exploding loss or gradient "
                "(learning rate too high, or large gradients at some inputs) pushed the weights "
                "and activations beyond the format's range"
            ),
            EXP_OVERFLOW: (
                "exp overflow: exp(x) exceeds the format's largest value once x > ln(max) "
                "(about 11.1 in float16, 88.7 in float32 and bfloat16)"
            ),
            OVERFLOW: (
                "overflow: a product or sum of large values exceeded the format's largest value"
            ),
            LOG_ZERO: (
                "log of 0: a value that is mathematically positive (a probability, a variance, a "
                "norm) rounded to exactly 0 and its log is -inf; later operations turn it into "
                "inf or NaN"
            ),
            DIV_ZERO: "division by 0: x / 0 is inf (a zero variance, norm or count)",
            NAN: (
                "0/0, inf - inf or 0 * inf (for example a mean over an empty selection, a "
                "normalisation of an all-zero vector, or a sqrt/log of a negative number)"
            ),
            DATA: "the batch itself held inf/NaN: a data or preprocessing problem",
            UNKNOWN: "the history does not say how the non-finite value was made",
        }
    )
    FIXES: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            EXPLOSION: (
                "Clip gradients (finite.clip_grad_norm_, or ZClip/AutoClip to adapt the "
                "threshold), lower the learning rate or add warmup, and skip steps with "
                "non-finite gradients (finite.LossScaler does)."
            ),
            EXP_OVERFLOW: (
                "Subtract the maximum before exponentiating: use finite.ops.softmax, "
                "log_softmax, logsumexp or cross_entropy, or compute the op in float32."
            ),
            OVERFLOW: (
                "Keep this module in float32 (autocast disabled around it), normalise its "
                "inputs, or bound its outputs (finite.ops.softcap); bfloat16 has float32's range."
            ),
            LOG_ZERO: (
                "Compute log-probabilities directly from logits: F.log_softmax or F.cross_entropy "
                "instead of log(softmax(x)) (finite.ops.log_softmax, cross_entropy, "
                "binary_cross_entropy_with_logits), or finite.ops.safe_log for a genuine log."
            ),
            DIV_ZERO: (
                "Guard the denominator: finite.ops.safe_div, or x / (d + eps) with an eps the "
                "format can hold (1e-5 underflows to 0 in neither float16 nor bfloat16)."
            ),
            NAN: (
                "Guard the operation: finite.ops.safe_div / safe_sqrt / safe_log, add an eps to "
                "normalisers, and check reductions over possibly empty selections."
            ),
            DATA: (
                "Check the data pipeline: assert torch.isfinite(batch).all() in the loader, "
                "fix the transform (e.g. (x - mean) / (std + eps)), or drop those records."
            ),
            UNKNOWN: "See the other findings for the steps before it.",
        }
    )


def _nan(x: float | None) -> bool:
    return x is not None and math.isnan(x)


def _absmax(summaries: tuple[TensorSummary, ...]) -> float:
    values = [s.absmax for s in summaries if s.absmax is not None and not math.isnan(s.absmax)]
    return max(values) if values else math.nan


def mechanism(
    event: NonfiniteEvent | None,
    fmt: FloatFormat | None,
    growth: float = math.nan,
    value: float = math.nan,
) -> str:
    """The likely :class:`Mechanism` of a non-finite value.

    Parameters
    ----------
    event : NonfiniteEvent or None
        Where the value appeared; its input/output summaries carry ``min`` and ``max``.
    fmt : FloatFormat or None
        The format the values were computed in (float32 when None).
    growth : float
        How many times the loss or gradient norm grew over the preceding steps.
    value : float
        The non-finite value seen downstream (the loss), used when the event's outputs
        carry only a flag (outputs of modules with children).

    Returns
    -------
    str
        One of the :class:`Mechanism` names. Growth of at least :data:`EXPLOSION_GROWTH`
        or inputs within 1 bit of the format's maximum make it an explosion; otherwise the
        output decides: NaN -> ``0/0``; ``+inf`` -> exp overflow when the inputs reach
        ``ln(max)``, an overflow when they reach ``sqrt(max)``, else a division by 0;
        only ``-inf`` -> ``log(0)``. Without the output's range, an infinite loss is read as
        ``log(0)`` (``-log(p)`` with ``p == 0``, the usual source of an infinite loss) and a
        NaN loss as ``0/0`` (which includes ``inf / inf`` after an exp overflow).
    """
    if event is not None and event.phase == "input":
        return Mechanism.DATA
    big = (fmt.max if fmt is not None else 3.4028234663852886e38) / 2.0
    if growth >= EXPLOSION_GROWTH:
        return Mechanism.EXPLOSION
    if event is None:
        return Mechanism.UNKNOWN
    in_absmax = _absmax(event.inputs)
    if in_absmax >= big:
        return Mechanism.EXPLOSION
    outs = [s for s in event.outputs if s.min is not None and s.max is not None]
    if not outs:
        if math.isinf(value):
            return Mechanism.LOG_ZERO
        return Mechanism.NAN if math.isnan(value) else Mechanism.UNKNOWN
    if any(_nan(s.min) or _nan(s.max) for s in outs):
        return Mechanism.NAN
    pos_inf = any(s.max == math.inf for s in outs)
    neg_inf = any(s.min == -math.inf for s in outs)
    if pos_inf:
        if math.isnan(in_absmax):
            return Mechanism.OVERFLOW
        if in_absmax > math.log(big * 2.0):
            return Mechanism.EXP_OVERFLOW if in_absmax < math.sqrt(big) else Mechanism.OVERFLOW
        if event.origin == "<loss>":
            return Mechanism.LOG_ZERO  # -log(p) with p == 0
        return Mechanism.DIV_ZERO
    if neg_inf:
        return Mechanism.LOG_ZERO
    return Mechanism.UNKNOWN


def _where(event: NonfiniteEvent) -> str:
    if event.origin == "<loss>":
        return "the loss computation (the model's outputs were finite)"
    if event.origin == "":
        return f"the model's own forward code ({event.origin_type})"
    return f"{event.origin!r} ({event.origin_type})"


def _event_evidence(event: NonfiniteEvent, plot: str | None = None) -> list[Evidence]:
    items = [
        Evidence(
            f"step {event.step}: the {event.phase} pass made inf/NaN first in {_where(event)}",
            step=event.step,
            module=event.origin or None,
            plot=plot,
        )
    ]
    for label, summaries in (("input", event.inputs), ("output", event.outputs)):
        for i, s in enumerate(summaries[:2]):
            items.append(
                Evidence(
                    f"  {label}[{i}] of {event.origin or 'the model'}: {s}",
                    step=event.step,
                    module=event.origin or None,
                    value=s.absmax if s.absmax is not None else None,
                )
            )
    return items


def nonfinite_input_data(history: History, context: Context) -> Finding | None:
    """The model received inf/NaN in its input batch (a data problem).

    Fires on any ``"input"`` event. Severity critical: every later number of that step is
    meaningless.
    """
    events = [e for e in history.events if e.phase == "input"]
    if not events:
        return None
    steps = sorted({e.step for e in events})
    first = min(events, key=lambda e: e.step)
    evidence = [
        Evidence(
            f"{len(steps)} step(s) had non-finite values in the model's input, first at step "
            f"{steps[0]}",
            step=steps[0],
            value=float(len(steps)),
            plot="loss",
        )
    ]
    for i, s in enumerate(first.inputs[:4]):
        evidence.append(Evidence(f"  input[{i}] at step {first.step}: {s}", step=first.step))
    return Finding(
        code="nonfinite_input_data",
        severity="critical",
        title="Non-finite values in the input data",
        evidence=tuple(evidence),
        cause=(
            "The batch itself holds inf/NaN before any layer runs: corrupt records, a "
            "feature transform that divides by a zero standard deviation or takes log(0), "
            "or padding filled with NaN. The model is not at fault."
        ),
        fix=Mechanism.FIXES[Mechanism.DATA],
        references=(),
    )


def nonfinite_loss(history: History, context: Context) -> Finding | None:
    """The loss became inf or NaN, with where it came from and the likely mechanism.

    The origin is the monitor's event of the first non-finite step (forward or input
    phase); the mechanism is :func:`mechanism` of that event, with the growth of the loss
    and gradient norm over the preceding steps. Severity critical.
    """
    steps, loss, nonfinite = loss_nonfinite(history)
    if not nonfinite.any():
        return None
    bad_steps = steps[nonfinite]
    first = int(bad_steps[0])
    value = float(loss[nonfinite][0])
    rows = step_rows(history)
    growth = max(
        growth_before(steps, loss, first),
        growth_before(rows["step"], rows["grad_norm"], first),
        key=lambda g: -math.inf if math.isnan(g) else g,
    )
    events = [e for e in events_at(history.events, first) if e.phase in ("input", "forward")]
    event = events[0] if events else None
    kind = mechanism(event, context.format, growth, value)
    evidence = [
        Evidence(
            f"loss is {num(value)} at step {first}; non-finite at {len(bad_steps)} of "
            f"{len(steps)} steps",
            step=first,
            value=value,
            plot="loss",
        )
    ]
    finite_before = loss[(steps < first) & np.isfinite(loss)]
    if len(finite_before):
        evidence.append(
            Evidence(
                f"last finite loss {num(float(finite_before[-1]))} (step "
                f"{int(steps[(steps < first) & np.isfinite(loss)][-1])})",
                value=float(finite_before[-1]),
                plot="loss",
            )
        )
    if not math.isnan(growth) and growth >= 10:
        evidence.append(
            Evidence(
                f"the loss or gradient norm grew {num(growth)}x over the median of the "
                "steps before",
                step=first,
                value=growth,
                plot="grad_norm",
            )
        )
    if event is not None:
        evidence += _event_evidence(event, plot="loss")
    else:
        evidence.append(
            Evidence(
                "no event names the origin (monitor the run with finite.Monitor to get one)",
                step=first,
            )
        )
    where = f" in {_where(event)}" if event is not None else ""
    how = "" if kind == Mechanism.UNKNOWN else f": {kind}"
    return Finding(
        code="nonfinite_loss",
        severity="critical",
        title=f"Loss became {'NaN' if math.isnan(value) else num(value)} at step {first}"
        f"{how}{where}",
        evidence=tuple(evidence),
        cause=f"Likely mechanism: {Mechanism.CAUSES[kind]}.",
        fix=f"{Mechanism.FIXES[kind]} {_LOCATE}",
        references=(
            "I. Goodfellow, Y. Bengio, A. Courville, Deep Learning, MIT Press 2016, "
            "section 4.1 (overflow and underflow; softmax stabilisation).",
        ),
    )


def nonfinite_gradients(history: History, context: Context) -> Finding | None:
    """Gradients became inf/NaN in the backward pass while the loss was finite, and the
    optimizer step was not skipped.

    Steps whose forward pass was already non-finite belong to :func:`nonfinite_loss`, and
    steps a loss scaler skipped are its overflow handling (see ``loss_scale_collapse``).
    Severity critical: the weights took the step.
    """
    rows = step_rows(history)
    if len(rows) == 0:
        return None
    steps, _, loss_bad = loss_nonfinite(history)
    forward_bad = {int(s) for s in steps[loss_bad]}
    forward_bad |= {e.step for e in history.events if e.phase in ("input", "forward")}
    skipped = skipped_steps(history)
    backward_events = [e for e in history.events if e.phase == "backward"]
    flagged = {
        int(s)
        for s, n, g in zip(rows["step"], rows["nonfinite_grads"], rows["grad_norm"], strict=True)
        if n > 0 or (n >= 0 and not math.isfinite(g))
    }
    flagged |= {e.step for e in backward_events}
    bad = sorted(s for s in flagged if s not in forward_bad and s not in skipped)
    if not bad:
        return None
    first = bad[0]
    evidence = [
        Evidence(
            f"non-finite gradients at {len(bad)} step(s) with a finite loss, first at step "
            f"{first}; the optimizer stepped with them",
            step=first,
            value=float(len(bad)),
            plot="grad_norm",
        )
    ]
    growth = growth_before(rows["step"], rows["grad_norm"], first)
    if not math.isnan(growth) and growth >= 10:
        evidence.append(
            Evidence(
                f"the gradient norm grew {num(growth)}x over the median before step {first}",
                step=first,
                value=growth,
                plot="grad_norm",
            )
        )
    event = next((e for e in backward_events if e.step == first), None)
    if event is not None:
        evidence.append(
            Evidence(
                f"step {first}: the backward pass made inf/NaN first in {_where(event)}",
                step=first,
                module=event.origin or None,
            )
        )
        if event.parameters:
            shown = ", ".join(event.parameters[:6])
            more = f" and {len(event.parameters) - 6} more" if len(event.parameters) > 6 else ""
            evidence.append(
                Evidence(f"parameters with non-finite gradients: {shown}{more}", step=first)
            )
    explosion = not math.isnan(growth) and growth >= EXPLOSION_GROWTH
    cause = (
        "The gradient grew until it overflowed (an exploding gradient)."
        if explosion
        else "An operation with an unbounded derivative at its edge: sqrt at 0 "
        "(d/dx sqrt(x) = inf), log or division near 0, pow with a negative base, or "
        "norm of an all-zero vector; or a float16 gradient that overflowed."
    )
    return Finding(
        code="nonfinite_gradients",
        severity="critical",
        title=f"Non-finite gradients from a finite loss at step {first}",
        evidence=tuple(evidence),
        cause=cause,
        fix=(
            "Use ops whose gradients stay finite at the edges (finite.ops.safe_sqrt, "
            "safe_log, safe_div, l2_norm); skip steps with non-finite gradients "
            "(finite.LossScaler skips them, Monitor(on_nonfinite='raise') stops before the "
            f"weights change); clip gradients. {_LOCATE}"
        ),
        references=(),
    )


def nonfinite_weights(history: History, context: Context) -> Finding | None:
    """Weights became inf/NaN (measured before or after an optimizer step).

    Reads the parameter table (``weight_norm`` before a step, ``update_norm`` of the step)
    and the weight exponent histograms (their last bin counts inf and NaN). Severity
    critical: the model cannot recover without restoring a checkpoint.
    """
    params = history.params
    skipped = skipped_steps(history)
    found: dict[str, int] = {}
    growth: dict[str, float] = {}
    for name, rows in by_name(params, "param").items():
        steps, weight, update = rows["step"], rows["weight_norm"], rows["update_norm"]
        ok = np.isfinite(weight)
        if not ok.any() and not np.isinf(weight).any():
            continue  # no optimizer step was measured for this parameter
        # NaN also means "not measured": a NaN weight norm counts only on a step that was
        # taken after the weight had been measured finite.
        taken = np.array([int(s) not in skipped for s in steps], dtype=bool)
        start = steps[ok][0] if ok.any() else steps[0]
        before = ~ok & taken & (steps >= start)
        # weight_norm is of the weight before the step: a finite weight with a non-finite
        # update means the step itself made the weight non-finite.
        after = ok & taken & ~np.isfinite(update)
        candidates = [int(s) for s in steps[before]] + [int(s) + 1 for s in steps[after]]
        if candidates:
            found[name] = min(candidates)
            finite_weights = weight[ok & (weight > 0)]
            if len(finite_weights) >= 2:
                growth[name] = float(finite_weights[-1] / finite_weights[0])
    histograms = history.histograms
    if len(histograms):
        weights = histograms.where(tensor="weight")
        for i in range(len(weights)):
            if weights["counts"][i][-1] > 0:
                name, step = weights["param"][i], int(weights["step"][i])
                found[name] = min(found.get(name, step), step)
    if not found:
        return None
    first = min(found.values())
    names = sorted(found, key=lambda n: (found[n], n))
    evidence = [
        Evidence(
            f"{len(names)} parameter(s) hold inf/NaN from step {first}: "
            + ", ".join(names[:6])
            + (f" and {len(names) - 6} more" if len(names) > 6 else ""),
            step=first,
            module=names[0],
            value=float(len(names)),
            plot="histograms",
        )
    ]
    grown = {n: g for n, g in growth.items() if g >= 100}
    for name in sorted(grown, key=grown.get, reverse=True)[:3]:  # type: ignore[arg-type]
        evidence.append(
            Evidence(
                f"|{name}| grew {num(grown[name])}x before it became non-finite",
                module=name,
                value=grown[name],
                plot="update_ratio",
            )
        )
    rows = step_rows(history)
    bad_grad_steps = [
        int(s)
        for s, n, skipped in zip(
            rows["step"], rows["nonfinite_grads"], rows["skipped"], strict=True
        )
        if n > 0 and not skipped and s <= first
    ]
    if bad_grad_steps:
        evidence.append(
            Evidence(
                f"gradients were non-finite at step {bad_grad_steps[0]} and the optimizer "
                "applied them",
                step=bad_grad_steps[0],
                plot="grad_norm",
            )
        )
    cause = (
        "An optimizer step applied inf/NaN gradients (nothing skipped the step)"
        if bad_grad_steps
        else "The weights grew without bound (unbounded optimisation: learning rate too "
        "high, no weight decay) or a non-finite gradient was applied"
    )
    return Finding(
        code="nonfinite_weights",
        severity="critical",
        title=f"Weights became non-finite at step {first}",
        evidence=tuple(evidence),
        cause=cause + "; once a weight is inf/NaN every output that depends on it is too.",
        fix=(
            "Restore the last checkpoint before the step; make steps with non-finite "
            "gradients skip (finite.LossScaler, SpikeGuard veto, or Monitor(on_nonfinite="
            "'raise')); fix the origin of the non-finite gradient (see the other findings); "
            "clip gradients and add weight decay if the weights grew."
        ),
        references=(),
    )
