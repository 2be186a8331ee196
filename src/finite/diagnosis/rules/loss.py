"""Rules on the shape of the loss curve: stuck, oscillating, diverging after progress.

All three read the finite losses of the lowest rank up to the first non-finite one
(which ``nonfinite_loss`` reports) and smooth with running medians, which ignore single
noisy minibatches.
"""

from __future__ import annotations

import math

import numpy as np

from finite.diagnosis.context import Context
from finite.diagnosis.finding import Evidence, Finding
from finite.diagnosis.rules._series import (
    by_name,
    finite_loss,
    median,
    num,
    percent,
    quantile,
    rolling_median,
    step_rows,
)
from finite.monitor import History

__all__ = [
    "GIVEBACK",
    "OSCILLATION_AUTOCORRELATION",
    "PLATEAU_CHANGE",
    "PROGRESS",
    "SPIKE_RATIO",
    "divergence_after_progress",
    "loss_oscillation",
    "loss_plateau",
]

#: Fewest finite losses for a judgement on the curve's shape.
MIN_STEPS = 20
#: Loss plateau: the smoothed loss never fell more than this share below its start ...
PLATEAU_CHANGE = 0.02
#: ... over at least this many steps.
PLATEAU_STEPS = 30

#: A loss spike: at least this many times the median of the 5 steps before it ...
SPIKE_RATIO = 3.0
#: ... and this many robust standard deviations (1.4826 * MAD) above it ...
SPIKE_Z = 4.0
#: ... for at least this many consecutive steps.
SPIKE_STEPS = 3
#: Period-2 oscillation: over the last quarter of the run (at least this many steps) ...
OSCILLATION_STEPS = 30
#: ... the lag-1 autocorrelation of the loss minus a quadratic trend is below this ...
OSCILLATION_AUTOCORRELATION = -0.6
#: ... with an amplitude (standard deviation) of at least this share of the loss.
OSCILLATION_AMPLITUDE = 0.05

#: Divergence: the run first made at least this share of progress from its initial loss ...
PROGRESS = 0.20
#: ... then gave back at least this share of that progress and did not recover.
GIVEBACK = 0.5
#: Progress and give-back must also exceed this many robust standard deviations of the
#: loss around its running median (the minibatch noise).
NOISE_MULTIPLE = 3.0

_LR_REFS = (
    "Y. LeCun, L. Bottou, G. Orr, K.-R. Mueller, 'Efficient BackProp', 1998 (a step size "
    "above 2/lambda_max diverges).",
    "J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, 'Gradient descent on neural "
    "networks typically occurs at the edge of stability', ICLR 2021.",
)


def _window(n: int) -> int:
    """Odd running-median width: a tenth of the run, between 5 and 25 steps."""
    return max(5, min(25, n // 10)) | 1


def _noise(loss: np.ndarray, w: int) -> float:
    """Robust standard deviation (1.4826 * MAD) of the loss around its running median."""
    residual = loss - rolling_median(loss, w)
    return 1.4826 * float(np.median(np.abs(residual)))


def _lower_lr(context: Context) -> str:
    lr = context.learning_rate
    if lr is None or not lr > 0:
        return "Lower the learning rate 3-10x"
    return f"Lower the learning rate from {lr:.3g} to {lr / 3:.2g}-{lr / 10:.2g}"


def _spikes(steps: np.ndarray, loss: np.ndarray) -> list[tuple[int, float, float, int]]:
    """(first step, peak loss, median before, length) of each spike episode.

    A step is high when its loss is at least :data:`SPIKE_RATIO` times the median of the
    5 steps before the episode and :data:`SPIKE_Z` robust standard deviations (from the
    step-to-step differences of the 50 steps before) above it;
    an episode is a run of at least :data:`SPIKE_STEPS` high steps. A single high step is
    left out: one hard minibatch does that, while a step that threw the weights off keeps
    the loss high for the steps after it.
    """
    out = []
    i = 5
    while i < len(loss):
        before = loss[max(0, i - 50) : i]
        base = float(np.median(before[-5:]))
        # Noise from step-to-step differences, which a falling trend barely inflates:
        # for independent noise of deviation s, median |diff| = 0.6745 * sqrt(2) * s.
        spread = 1.4826 * float(np.median(np.abs(np.diff(before)))) / math.sqrt(2.0)

        def high(value: float, base: float = base, spread: float = spread) -> bool:
            return value >= SPIKE_RATIO * base and value - base >= SPIKE_Z * spread

        if base > 0 and high(loss[i]):
            j = i
            while j < len(loss) and high(loss[j]):
                j += 1
            if j - i >= SPIKE_STEPS:
                out.append((int(steps[i]), float(np.max(loss[i:j])), base, j - i))
            i = j
        else:
            i += 1
    return out


def _autocorrelation(x: np.ndarray) -> float:
    x = x - x.mean()
    denominator = float(np.dot(x, x))
    return float(np.dot(x[:-1], x[1:]) / denominator) if denominator > 0 else math.nan


def loss_oscillation(history: History, context: Context) -> Finding | None:
    """The loss jumps up and down: the learning rate is likely too high.

    Two signatures, on the finite losses: *spikes*, at least :data:`SPIKE_STEPS` (3)
    consecutive losses at least :data:`SPIKE_RATIO` (3) times the median of the 5 steps
    before them and :data:`SPIKE_Z` (4) robust standard deviations above it (one outlier
    minibatch is not a spike); and *period-2 oscillation* over the last quarter of the
    run (at least :data:`OSCILLATION_STEPS`, 30, steps): the loss minus a quadratic fit
    has a lag-1 autocorrelation below :data:`OSCILLATION_AUTOCORRELATION` (-0.6; a clean
    alternation gives about -0.8 to -1, independent minibatch noise about 0 and below
    -0.6 in fewer than 1% of 30-step windows) and a standard deviation of at least
    :data:`OSCILLATION_AMPLITUDE` (5%) of the loss. Either fires the rule.
    """
    steps, loss, _ = finite_loss(history)
    if len(loss) < MIN_STEPS:
        return None
    spikes = _spikes(steps, loss)
    oscillating, rho, amplitude = False, math.nan, math.nan
    tail = max(OSCILLATION_STEPS, len(loss) // 4)
    window_steps, window = steps[-tail:], loss[-tail:]
    if len(window) >= OSCILLATION_STEPS:
        t = np.arange(len(window), dtype=np.float64)
        residual = window - np.polyval(np.polyfit(t, window, 2), t)
        rho = _autocorrelation(residual)
        level = abs(float(np.median(window)))
        amplitude = float(np.std(residual)) / level if level > 0 else math.nan
        oscillating = rho <= OSCILLATION_AUTOCORRELATION and amplitude >= OSCILLATION_AMPLITUDE
    if not oscillating and not spikes:
        return None
    evidence = []
    for step, value, base, length in spikes[:3]:
        evidence.append(
            Evidence(
                f"loss spiked to {num(value)} at step {step}, {num(value / base)}x the median "
                f"of the steps before, and stayed high for {length} steps",
                step=step,
                value=value,
                plot="loss",
            )
        )
    if len(spikes) > 3:
        evidence.append(
            Evidence(f"{len(spikes)} loss spikes in all", value=float(len(spikes)), plot="loss")
        )
    if oscillating:
        evidence.append(
            Evidence(
                f"steps {int(window_steps[0])}-{int(window_steps[-1])}: the loss alternates "
                f"up and down (lag-1 autocorrelation {rho:.2f}) with an amplitude of "
                f"{percent(amplitude)} of the loss",
                step=int(window_steps[0]),
                value=rho,
                plot="loss",
            )
        )
    return Finding(
        code="loss_oscillation",
        severity="warning",
        title=("Loss oscillates" if oscillating else "Loss spikes")
        + (" and spikes" if spikes and oscillating else "")
        + ": the learning rate is likely too high",
        evidence=tuple(evidence),
        cause=(
            "With a step size above 2 / (the largest curvature), gradient descent overshoots "
            "the minimum along the sharpest direction: the loss alternates up and down or "
            "jumps when a step lands on the far wall of the valley."
        ),
        fix=(
            f"{_lower_lr(context)}, add warmup, or clip the gradient norm "
            "(finite.clip_grad_norm_); finite.SpikeGuard can skip the spike steps."
        ),
        references=_LR_REFS,
    )


def divergence_after_progress(history: History, context: Context) -> Finding | None:
    """The loss went down, then came back up (or turned non-finite) and stayed there.

    With a running median of the finite losses (over a tenth of the run, 5 to 25 steps):
    the run made progress (the smoothed minimum is at least :data:`PROGRESS`, 20%, and
    :data:`NOISE_MULTIPLE` (3) robust standard deviations of the minibatch noise below the
    initial loss) and afterwards gave back at least :data:`GIVEBACK` (half) of it, and 3
    noise deviations, for good: the last smoothed value is still that high, or the loss
    became non-finite. Transient spikes that recover are
    ``loss_oscillation``. Severity critical.
    """
    steps, loss, first_bad = finite_loss(history)
    if len(loss) < 10:
        return None
    w = _window(len(loss))
    smooth = rolling_median(loss, w)
    noise = _noise(loss, w)
    initial = float(np.median(loss[:w]))
    best_index = int(np.argmin(smooth))
    best = float(smooth[best_index])
    progress = initial - best
    if not (progress > PROGRESS * abs(initial) and progress > NOISE_MULTIPLE * noise):
        return None
    limit = best + max(GIVEBACK * progress, NOISE_MULTIPLE * noise)
    after = smooth[best_index:]
    ended_high = float(after[-1]) >= limit and best_index < len(loss) - 1
    if not (ended_high or first_bad is not None):
        return None
    if ended_high:
        onset_index = best_index + int(np.argmax(after >= limit))
        onset = int(steps[onset_index])
    else:
        onset_index, onset = len(loss), int(first_bad)  # type: ignore[arg-type]
    evidence = [
        Evidence(
            f"loss fell from {num(initial)} to {num(best)} (step {int(steps[best_index])})",
            value=best,
            plot="loss",
        )
    ]
    if ended_high:
        evidence.append(
            Evidence(
                f"then rose back above {num(limit)} from step {onset} and ended at "
                f"{num(float(after[-1]))} (running median of {w} steps)",
                step=onset,
                value=float(after[-1]),
                plot="loss",
            )
        )
    if first_bad is not None:
        evidence.append(
            Evidence(f"then became non-finite at step {first_bad}", step=first_bad, plot="loss")
        )
    rows = step_rows(history)
    norms = rows["grad_norm"].astype(np.float64)
    earlier = norms[(rows["step"] < steps[best_index]) & np.isfinite(norms)]
    around = norms[
        (rows["step"] >= steps[best_index]) & (rows["step"] <= onset) & np.isfinite(norms)
    ]
    p90 = quantile(earlier, 0.9)
    if len(earlier) and len(around) and median(earlier) > 0:
        peak = float(np.max(around))
        evidence.append(
            Evidence(
                f"grad norm peaked at {num(peak)} before the rise, {num(peak / median(earlier))}x "
                "its median during the progress",
                step=onset,
                value=peak,
                plot="grad_norm",
            )
        )
    dead = [
        (name, median(rows_["dead_fraction"][rows_["step"] >= onset]))
        for name, rows_ in by_name(history.modules, "module").items()
    ]
    dead = [(n, f) for n, f in dead if f >= 0.5]
    if dead:
        evidence.append(
            Evidence(
                "after the rise, dead ReLU units: "
                + ", ".join(f"{n} {percent(f)}" for n, f in dead[:3]),
                step=onset,
                module=dead[0][0],
                value=dead[0][1],
            )
        )
    clip = f" at about {p90:.2g} (the 90th percentile of the norm during the progress)"
    return Finding(
        code="divergence_after_progress",
        severity="critical",
        title=f"Loss diverged at step {onset} after decreasing to {num(best)}",
        evidence=tuple(evidence),
        cause=(
            "Training reached a sharper region of the loss surface (curvature grows as the "
            "loss falls) where the learning rate is too high, or a gradient explosion at "
            "some inputs threw the weights off; large updates can also kill ReLU units for "
            "good."
        ),
        fix=(
            f"{_lower_lr(context)} or decay it, add warmup, clip the gradient norm"
            + (clip if math.isfinite(p90) else "")
            + ", use finite.SpikeGuard to skip outlier steps, and restart from a checkpoint "
            f"saved before step {onset}."
        ),
        references=_LR_REFS,
    )


def loss_plateau(history: History, context: Context) -> Finding | None:
    """The loss has not moved since the start of the run.

    Fires when, over at least :data:`PLATEAU_STEPS` (30) finite losses, the running median
    never fell more than :data:`PLATEAU_CHANGE` (2%) below its initial value. (A run that
    converged and then levelled off made progress first and does not fire.) Evidence of
    the usual causes is attached when present: saturated sigmoid/tanh outputs, dead ReLU
    units, vanishing gradients, and weight updates rounded away.
    """
    steps, loss, _ = finite_loss(history)
    if len(loss) < PLATEAU_STEPS:
        return None
    w = _window(len(loss))
    smooth = rolling_median(loss, w)
    initial = float(np.median(loss[:w]))
    lowest = float(np.min(smooth))
    scale = abs(initial) if initial != 0 else 1.0
    if initial - lowest > PLATEAU_CHANGE * scale:
        return None
    evidence = [
        Evidence(
            f"loss stayed at {num(initial)} (lowest running median {num(lowest)}, "
            f"{percent(max(initial - lowest, 0.0) / scale)} below the start) over steps "
            f"{int(steps[0])}-{int(steps[-1])}",
            step=int(steps[0]),
            value=initial,
            plot="loss",
        )
    ]
    causes = []
    modules = by_name(history.modules, "module")
    for name, rows in modules.items():
        saturated = median(rows["saturated_fraction"])
        dead = median(rows["dead_fraction"])
        if saturated >= 0.5:
            evidence.append(
                Evidence(
                    f"{name} ({rows['type'][0]}): {percent(saturated)} of outputs saturated",
                    module=name,
                    value=saturated,
                )
            )
            causes.append("saturated activations pass almost no gradient")
        if dead >= 0.5:
            evidence.append(
                Evidence(
                    f"{name} ({rows['type'][0]}): {percent(dead)} of units dead",
                    module=name,
                    value=dead,
                )
            )
            causes.append("dead ReLU units pass no gradient")
    ratio = median(history.params["update_ratio"]) if len(history.params) else math.nan
    if ratio < 1e-6:
        evidence.append(
            Evidence(
                f"median update/weight ratio {num(ratio)}: the weights barely change",
                value=ratio,
                plot="update_ratio",
            )
        )
        causes.append(
            "the weights barely change (learning rate too small, or updates rounded away "
            "in low precision)"
        )
    rows = step_rows(history)
    if len(rows) and median(rows["grad_norm"]) == 0:
        causes.append("the gradient is zero")
    cause = (
        "The loss is stuck: " + "; ".join(dict.fromkeys(causes)) + "."
        if causes
        else "The loss is stuck: the learning rate may be far too small, the gradient may "
        "not reach the parameters (detached tensors, frozen layers, saturated or dead "
        "units), or the targets may carry no learnable signal."
    )
    return Finding(
        code="loss_plateau",
        severity="warning",
        title=f"Loss is not decreasing (flat at {num(initial)} for {len(loss)} steps)",
        evidence=tuple(evidence),
        cause=cause,
        fix=(
            "Check that gradients reach every layer (see the gradient findings), raise the "
            "learning rate if updates are tiny, use ReLU-family activations with He "
            "initialisation and normalisation for saturated/dead units, and overfit one "
            "small batch first to rule out a bug in the data or loss."
        ),
        references=(
            "A. Karpathy, 'A recipe for training neural networks', 2019 (overfit one batch).",
        ),
    )
