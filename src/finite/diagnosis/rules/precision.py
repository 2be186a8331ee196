"""Rules on low-precision training: a collapsing loss scale, and swamped weight updates."""

from __future__ import annotations

import numpy as np

from finite.diagnosis.context import Context
from finite.diagnosis.finding import Evidence, Finding
from finite.diagnosis.rules._series import by_name, median, num, percent, skipped_steps, step_rows
from finite.formats import FloatFormat, get_format
from finite.monitor import History

__all__ = [
    "SKIP_SHARE",
    "SKIP_STREAK",
    "SWAMPED_SHARE",
    "bf16_update_swamping",
    "loss_scale_collapse",
]

#: Share of steps skipped (after the initial calibration) that is too many.
SKIP_SHARE = 0.05
#: Consecutive skipped steps (after the initial calibration) that is too many.
SKIP_STREAK = 5
#: Share of the low-precision weights whose updates are swamped.
SWAMPED_SHARE = 0.5

_SCALING_REFS = ("P. Micikevicius et al., 'Mixed Precision Training', ICLR 2018.",)


def _streaks(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start index, length) of the runs of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, len(flags) - start))
    return runs


def loss_scale_collapse(history: History, context: Context) -> Finding | None:
    """The loss scale backs off again and again, or sits at its minimum while steps skip.

    Reads ``loss_scale`` and ``skipped`` of every step. The first run of skipped steps is
    the scaler calibrating its initial scale and is left out, unless it never ends. Fires
    when, after it, :data:`SKIP_SHARE` (5%) of at least 20 steps were skipped, or
    :data:`SKIP_STREAK` (5) consecutive steps were; critical when the skipping happens at
    the minimum scale (``context.min_loss_scale``, else the scaler's default 1) or no step
    was ever taken. The evidence names the overflowing parameters from the monitor's
    backward events and the scaler's overflow report.
    """
    rows = step_rows(history)
    if len(rows) == 0:
        return None
    scale = rows["loss_scale"].astype(np.float64)
    if not np.isfinite(scale).any():
        return None
    skipped = rows["skipped"].astype(bool)
    steps = rows["step"]
    runs = _streaks(skipped)
    # The scaler calibrating its initial scale: the skips it starts with.
    calibration = runs[0][1] if runs and runs[0][0] == 0 else 0
    never = calibration == len(skipped)
    later_runs = [(start, n) for start, n in runs if start >= calibration and not never]
    later = skipped[calibration:]
    share = 1.0 if never else float(later.mean())
    longest = len(skipped) if never else max((n for _, n in later_runs), default=0)
    too_many = len(later) >= 20 and share >= SKIP_SHARE
    if not (never or too_many or longest >= SKIP_STREAK):
        return None
    minimum = context.min_loss_scale if context.min_loss_scale is not None else 1.0
    at_min = skipped & (scale <= minimum * (1 + 1e-6))
    if never:
        first_index = 0
    elif too_many:
        first_index = later_runs[0][0]
    else:
        first_index = next(start for start, n in later_runs if n >= SKIP_STREAK)
    first = int(steps[first_index])
    critical = never or int(at_min.sum()) >= 2
    finite = np.isfinite(scale)
    counted = len(skipped) if never else len(later)
    evidence = [
        Evidence(
            f"{int(skipped.sum()) if never else int(later.sum())} of {counted} steps skipped"
            + (" after the initial calibration" if calibration and not never else "")
            + f" ({percent(share)}), first at step {first}; longest run {longest}",
            step=first,
            value=share,
            plot="loss_scale",
        ),
        Evidence(
            f"loss scale went from {num(float(scale[finite][0]))} to "
            f"{num(float(scale[finite][-1]))} (lowest {num(float(scale[finite].min()))})",
            value=float(scale[finite].min()),
            plot="loss_scale",
        ),
    ]
    if at_min.any():
        evidence.append(
            Evidence(
                f"{int(at_min.sum())} skipped steps at the minimum scale {num(minimum)}, first "
                f"at step {int(steps[at_min][0])}",
                step=int(steps[at_min][0]),
                value=float(at_min.sum()),
                plot="loss_scale",
            )
        )
    skipped_set = {int(s) for s in steps[skipped]}
    overflowing: dict[str, int] = {}
    for event in history.events:
        if event.step in skipped_set:
            for name in event.parameters:
                overflowing[name] = overflowing.get(name, 0) + 1
    report = context.overflow_report
    if report is not None:
        for gradient in getattr(report, "gradients", ()):
            overflowing.setdefault(gradient.name, 1)
    if overflowing:
        names = sorted(overflowing, key=lambda n: -overflowing[n])
        evidence.append(
            Evidence(
                "overflowing gradients in: "
                + ", ".join(names[:6])
                + (f" and {len(names) - 6} more" if len(names) > 6 else ""),
                step=first,
                module=names[0],
            )
        )
    origins = sorted(
        {e.origin for e in history.events if e.step in skipped_set and e.phase != "input"}
    )
    if origins:
        evidence.append(
            Evidence(
                "first inf/NaN at the skipped steps made in: "
                + ", ".join(o or "the model" for o in origins[:4]),
                step=first,
                module=origins[0] or None,
            )
        )
    return Finding(
        code="loss_scale_collapse",
        severity="critical" if critical else "warning",
        title=(
            "No optimizer step was taken: every step's gradients overflowed"
            if never
            else "Loss scale collapsed: steps keep overflowing at the minimum scale"
            if critical
            else f"Loss scaler skips too many steps ({percent(share)})"
        ),
        evidence=tuple(evidence),
        cause=(
            "Every skipped step found inf/NaN gradients. When the scale is already at its "
            "minimum (or keeps backing off), scaling is not the problem: the forward pass "
            "or the unscaled gradients themselves exceed float16's range (65504), so every "
            "step is thrown away and training stalls."
        ),
        fix=(
            "Find the overflowing module (the events and parameters above; "
            "scaler.overflow_report(model); finite.locate on a failing step) and keep it in "
            "float32 (autocast disabled around it), normalise its inputs, or bound its "
            "outputs (finite.ops.softcap); clip gradients; or train in bfloat16, which has "
            "float32's range and needs no loss scaling."
        ),
        references=_SCALING_REFS,
    )


def _weight_format(
    name: str, context: Context, history: History
) -> tuple[FloatFormat | None, bool]:
    """(storage format of a weight, whether it is known rather than assumed)."""
    if name in context.weight_formats:
        return context.weight_formats[name], True
    if context.weight_formats:
        return None, True  # the model is known and has no such float parameter
    if history.format:
        return get_format(history.format), False
    return None, False


def bf16_update_swamping(history: History, context: Context) -> Finding | None:
    """Weight updates too small for the weights' precision are rounded away.

    A weight stored with ``p`` significant bits (8 in bfloat16, 11 in float16) does not
    change when ``|update| < |w| * 2**-p`` (half its spacing). Per low-precision weight
    (16 bits or fewer), the median of ``update_ratio = |w_after - w_before| / |w_before|``
    over the measured steps is compared with half the format's epsilon; the rule fires
    when the weights below it hold :data:`SWAMPED_SHARE` (50%) of the low-precision
    elements. An update rounded away entirely has ratio 0. It also fires when
    ``context.lost_update_fraction`` (from :func:`finite.compensated`) reaches 50%; with
    compensation in use the updates are being recovered and the finding is info.

    Weight dtypes come from the model (through the Monitor); from a history alone they are
    assumed to be the monitor's format and the finding is at most info, unless updates
    were exactly zero (proof of rounding), since float32 master weights (autocast) take
    small updates without loss.
    """
    skipped = skipped_steps(history)
    swamped, total = 0, 0
    worst: list[tuple[str, float, float, int]] = []
    zero_updates = 0
    assumed = False
    first_step = None
    formats = set()
    for name, rows in by_name(history.params, "param").items():
        fmt, known = _weight_format(name, context, history)
        if fmt is None or fmt.bits > 16:
            continue
        keep = np.isfinite(rows["update_ratio"].astype(np.float64)) & np.array(
            [int(s) not in skipped for s in rows["step"]], dtype=bool
        )
        if not keep.any():
            continue
        ratio = median(rows["update_ratio"][keep])
        numel = int(rows["numel"][0])
        total += numel
        limit = fmt.eps / 2
        if ratio < limit:
            swamped += numel
            assumed |= not known
            formats.add(fmt.name)
            worst.append((name, ratio, limit, numel))
            step = int(rows["step"][keep][0])
            first_step = step if first_step is None else min(first_step, step)
            grads = rows["grad_norm"][keep]
            zeros = (rows["update_norm"][keep] == 0) & (grads > 0)
            zero_updates += int(zeros.sum() > keep.sum() // 2) * numel
    share = swamped / total if total else 0.0
    lost = context.lost_update_fraction
    metered = lost is not None and lost >= SWAMPED_SHARE
    if share < SWAMPED_SHARE and not metered:
        return None
    evidence = []
    if share >= SWAMPED_SHARE:
        evidence.append(
            Evidence(
                f"{percent(share)} of the {'/'.join(sorted(formats))} weight elements have a "
                "median update/weight ratio below half the format's epsilon",
                step=first_step,
                value=share,
                plot="update_ratio",
            )
        )
        for name, ratio, limit, _ in sorted(worst, key=lambda w: -w[3])[:4]:
            evidence.append(
                Evidence(
                    f"{name}: median update/weight {num(ratio)} < {num(limit)}",
                    step=first_step,
                    module=name,
                    value=ratio,
                    plot="update_ratio",
                )
            )
        if zero_updates:
            evidence.append(
                Evidence(
                    f"{percent(zero_updates / total)} of them did not change at all on most "
                    "steps although their gradients were non-zero",
                    value=zero_updates / total,
                    plot="update_ratio",
                )
            )
    if lost is not None:
        evidence.append(
            Evidence(
                f"swamping meter: {percent(lost)} of the low-precision weight updates would be "
                "rounded away by plain round-to-nearest",
                value=lost,
                plot="update_ratio",
            )
        )
    if context.compensation is not None:
        severity = "info"
        title = (
            f"Updates too small for the weights' precision ({context.compensation} "
            "compensation is recovering them)"
        )
        fix = (
            f"Keep the {context.compensation} compensation (finite.compensated); without it "
            "these updates would be lost."
        )
    else:
        proven = zero_updates / total >= SWAMPED_SHARE if total else False
        severity = "info" if assumed and not proven and not metered else "warning"
        fmt_names = "/".join(sorted(formats)) or "low-precision"
        title = f"Weight updates are rounded away in {fmt_names} (swamping)"
        fix = (
            "Wrap the optimizer: finite.compensated(optimizer, 'kahan') keeps the rounding "
            "error per weight (or 'stochastic' rounding); or keep float32 master weights "
            "(finite.MasterWeights); or raise the learning rate."
        )
        if severity == "info":
            fix = (
                "If the weights are stored in low precision (not float32 master weights): "
                + fix
                + " Pass model= to diagnose to know the weight dtypes."
            )
    return Finding(
        code="bf16_update_swamping",
        severity=severity,
        title=title,
        evidence=tuple(evidence),
        cause=(
            "A bfloat16 weight keeps 8 significant bits (float16: 11): adding an update "
            "smaller than half the spacing between neighbouring values, |u| < |w| * 2**-8 "
            "in bfloat16, rounds back to the old weight. Small learning rates, Adam's "
            "normalised steps late in training, and large weights make most updates vanish "
            "and training silently stalls."
        ),
        fix=fix,
        references=(
            "P. Zamirai, J. Zhang, C. R. Aberger, C. De Sa, 'Revisiting BFloat16 Training', "
            "arXiv:2010.06192, 2020.",
            "W. Kahan, 'Further remarks on reducing truncation errors', CACM 8(1), 1965.",
            "S. Gupta, A. Agrawal, K. Gopalakrishnan, P. Narayanan, 'Deep learning with "
            "limited numerical precision', ICML 2015.",
        ),
    )
