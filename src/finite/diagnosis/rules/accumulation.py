"""A rule on gradient accumulation: a half-precision ``.grad`` that overflowed on the sum.

Gradient accumulation adds the gradient of every micro-batch into the parameter's
``.grad``, which has the parameter's dtype. In float16 that sum must stay below 65504,
while each micro-batch's gradient only had to: summed losses over many micro-batches pass
it long before any single backward pass does.
"""

from __future__ import annotations

import numpy as np

from finite.diagnosis.context import Context
from finite.diagnosis.finding import Evidence, Finding
from finite.diagnosis.rules._series import loss_nonfinite, median, num, skipped_steps
from finite.formats import FloatFormat, get_format
from finite.monitor import History, NonfiniteEvent

__all__ = ["fp16_accumulation_overflow"]

#: Widest format whose ``.grad`` the rule watches: float16 and the 8-bit formats.
MAX_FORMAT_BITS = 16


def _forward_passes(history: History) -> float:
    """Median over the measured steps of the fewest calls of any leaf module in the step.

    A leaf module that runs once per forward pass runs once per micro-batch, so with
    gradient accumulation over ``N`` micro-batches this is ``N``; NaN without module
    records.
    """
    modules = history.modules
    if len(modules) == 0:
        return float("nan")
    per_step = [
        float(np.min(modules["calls"][modules["step"] == step]))
        for step in np.unique(modules["step"])
    ]
    return median(np.asarray(per_step))


def _parameter_format(name: str, context: Context, history: History) -> FloatFormat | None:
    if name in context.weight_formats:
        return context.weight_formats[name]
    if context.weight_formats:
        return None  # the model is known and has no such floating-point parameter
    return get_format(history.format) if history.format else None


def _finite_activation_gradients(event: NonfiniteEvent) -> bool:
    """The gradients flowing into and out of the event's module were finite."""
    return all(s.nonfinite == 0 for s in event.inputs + event.outputs)


def fp16_accumulation_overflow(history: History, context: Context) -> Finding | None:
    """Half-precision parameter gradients became inf while summing several micro-batches.

    Fires on the first backward event (a step with a finite loss that a loss scaler did
    not skip) whose non-finite values are in parameter gradients only, every activation
    gradient into and out of the module being finite, when those parameters are stored in
    a format of at most 16 bits whose ``.grad`` therefore has the same range, and the
    steps accumulated several micro-batches: the leaf modules each ran at least twice per
    step (median over the measured steps of the fewest calls of any leaf module).
    Critical: the optimizer stepped with the inf.

    A model whose every leaf module runs several times in one forward pass (a recurrent
    cell applied step by step) looks the same to this rule; so does a single backward
    pass whose weight gradient overflowed on its own.
    """
    passes = _forward_passes(history)
    if not passes >= 2:
        return None
    steps, _, loss_bad = loss_nonfinite(history)
    forward_bad = {int(s) for s in steps[loss_bad]}
    forward_bad |= {e.step for e in history.events if e.phase in ("input", "forward")}
    skipped = skipped_steps(history)
    for event in sorted(history.events, key=lambda e: e.step):
        if event.phase != "backward" or not event.parameters:
            continue
        if event.step in forward_bad or event.step in skipped:
            continue
        if not _finite_activation_gradients(event):
            continue
        formats = [_parameter_format(name, context, history) for name in event.parameters]
        narrow = [f for f in formats if f is not None and f.bits <= MAX_FORMAT_BITS]
        if not narrow:
            continue
        return _finding(event, narrow[0], int(passes))
    return None


def _finding(event: NonfiniteEvent, fmt: FloatFormat, passes: int) -> Finding:
    shown = ", ".join(event.parameters[:6])
    more = f" and {len(event.parameters) - 6} more" if len(event.parameters) > 6 else ""
    where = event.origin or "the model"
    return Finding(
        code="fp16_accumulation_overflow",
        severity="critical",
        title=(
            f"The {fmt.name} .grad overflowed summing {passes} micro-batches at step {event.step}"
        ),
        evidence=(
            Evidence(
                f"step {event.step}: gradients of {shown}{more} became inf/NaN while every "
                f"activation gradient into and out of {where} stayed finite",
                step=event.step,
                module=event.origin or None,
                plot="grad_norm",
            ),
            Evidence(
                f"each leaf module ran {passes} times per step (median): {passes} forward "
                "and backward passes added their gradients into the same .grad",
                step=event.step,
                value=float(passes),
            ),
            Evidence(
                f"those parameters, and so their .grad, are stored in {fmt.name}, whose "
                f"largest value is {num(fmt.max)}",
                step=event.step,
                value=fmt.max,
            ),
        ),
        cause=(
            f"Gradient accumulation sums the micro-batch gradients in .grad, in the "
            f"parameter's dtype. Each micro-batch's gradient fitted in {fmt.name}; their sum "
            f"over {passes} micro-batches passed {num(fmt.max)} and became inf, and the "
            "optimizer stepped with it. With summed losses (normalised after the window) "
            f"the sum is {passes} times each micro-batch's gradient."
        ),
        fix=(
            "Sum the micro-batch gradients in float32: finite.MasterWeights, with "
            "mw.accumulate_grads_() after every backward pass (finite.StableStep(model, "
            "optimizer, master_weights=mw, accumulation_steps=N) does it), and normalise in "
            f"float32; or divide each micro-batch's loss by {passes} before backward "
            f"(StableStep does) so the {fmt.name} sum stays the size of one micro-batch's "
            "gradient; or train in bfloat16, which has float32's range."
        ),
        references=("P. Micikevicius et al., 'Mixed Precision Training', ICLR 2018.",),
    )
