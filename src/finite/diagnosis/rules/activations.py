"""Rules on activations: overflow headroom, dead ReLU units, saturated sigmoid/tanh."""

from __future__ import annotations

import numpy as np

from finite.diagnosis.context import Context
from finite.diagnosis.finding import Evidence, Finding
from finite.diagnosis.rules._series import by_name, median, num, percent
from finite.monitor import History, Table

__all__ = [
    "DEAD_SHARE",
    "HEADROOM_BITS",
    "SATURATED_SHARE",
    "activation_overflow_risk",
    "dead_units",
    "saturated_activations",
]

#: Binades between a module's largest output and the format's maximum below which it
#: is at risk of overflowing (2**4 = 16x).
HEADROOM_BITS = 4.0
#: Share of ReLU units dead for the whole batch (median over the second half of the run).
DEAD_SHARE = 0.5
#: ... at which the finding is critical: practically no gradient passes the layer.
DEAD_CRITICAL = 0.99
#: Share of sigmoid/tanh outputs whose derivative is below 1% of its maximum.
SATURATED_SHARE = 0.5


def _late(rows: Table) -> Table:
    """The rows of the second half of the run (all rows when there are few)."""
    if len(rows) < 4:
        return rows
    middle = np.median(rows["step"])
    return _rows_from(rows, rows["step"] >= middle)


def _rows_from(rows: Table, mask: np.ndarray) -> Table:
    return Table({name: rows[name][mask] for name in rows.columns})


def activation_overflow_risk(history: History, context: Context) -> Finding | None:
    """A module's outputs come within a few binades of the format's largest value.

    Reads ``headroom_bits`` (``log2(format.max / max|output|)``) of every module on the
    measured steps; fires when a finite output had less than :data:`HEADROOM_BITS` (4)
    binades left. Negative headroom (the output exceeds the format, e.g. a float32 run
    measured against float16) is critical. Dtype-aware by construction: the headroom is
    measured against the monitor's format (65504 for float16, 3.4e38 for bfloat16).
    """
    fmt = context.format
    modules = history.modules
    if len(modules) == 0:
        return None
    risky = []
    for name, rows in by_name(modules, "module").items():
        headroom = rows["headroom_bits"].astype(np.float64)
        ok = np.isfinite(headroom) & np.isfinite(rows["absmax"].astype(np.float64))
        if not ok.any():
            continue
        i = int(np.argmin(np.where(ok, headroom, np.inf)))
        if headroom[i] < HEADROOM_BITS:
            first = int(rows["step"][ok & (headroom < HEADROOM_BITS)][0])
            trend = _bits_per_100_steps(rows["step"][ok], headroom[ok])
            risky.append(
                (name, rows["type"][i], float(headroom[i]), float(rows["absmax"][i]), first, trend)
            )
    if not risky:
        return None
    risky.sort(key=lambda r: r[2])
    name_fmt = fmt.name if fmt is not None else (history.format or "the format")
    max_text = num(fmt.max) if fmt is not None else "its maximum"
    evidence = []
    for name, kind, bits, absmax, first, trend in risky[:5]:
        text = (
            f"{name} ({kind}): largest |output| {num(absmax)}, {bits:.1f} bits below the "
            f"{name_fmt} maximum {max_text} (first below {HEADROOM_BITS:g} bits at step {first})"
        )
        if trend is not None and trend < -0.1:
            text += f"; headroom falls {-trend:.2g} bits per 100 steps"
        evidence.append(Evidence(text, step=first, module=name, value=bits))
    critical = risky[0][2] < 0
    return Finding(
        code="activation_overflow_risk",
        severity="critical" if critical else "warning",
        title=(
            f"Activations {'exceed' if critical else 'come close to'} the {name_fmt} range in "
            f"{risky[0][0] or 'the model'}"
        ),
        evidence=tuple(evidence),
        cause=(
            f"Outputs within 2**{HEADROOM_BITS:g} of the largest {name_fmt} value overflow to "
            "inf as soon as an input is a little larger or the weights grow a little more; "
            "attention logits, residual streams and unnormalised projections are typical."
        ),
        fix=(
            "Keep these modules in float32 (autocast disabled around them; "
            "finite.compare_precision confirms which), normalise their inputs (LayerNorm, "
            "QK-norm for attention logits), bound the outputs (finite.ops.softcap), or "
            "train in bfloat16, which has float32's range."
        ),
        references=(
            "M. Dehghani et al., 'Scaling vision transformers to 22 billion parameters', "
            "ICML 2023 (QK-norm against attention-logit growth).",
        ),
    )


def _bits_per_100_steps(steps: np.ndarray, headroom: np.ndarray) -> float | None:
    if len(steps) < 3 or np.ptp(steps) == 0:
        return None
    slope = float(np.polyfit(steps.astype(np.float64), headroom, 1)[0])
    return 100.0 * slope


def dead_units(history: History, context: Context) -> Finding | None:
    """ReLU layers whose units output zero for every example of the batch.

    Median ``dead_fraction`` over the second half of the run, per ReLU/ReLU6 module; fires
    at :data:`DEAD_SHARE` (50%), critical at :data:`DEAD_CRITICAL` (99%: the layer passes
    no gradient). Small batches inflate the fraction (a unit is dead only if it is zero
    for the whole batch).
    """
    found = []
    for name, rows in by_name(history.modules, "module").items():
        if np.isnan(rows["dead_fraction"].astype(np.float64)).all():
            continue
        late = _late(rows)
        share = median(late["dead_fraction"])
        if share >= DEAD_SHARE:
            start = median(rows["dead_fraction"][: max(1, len(rows) // 10)])
            first_over = rows["step"][rows["dead_fraction"] >= DEAD_SHARE]
            first = int(first_over[0]) if len(first_over) else int(late["step"][0])
            found.append((name, rows["type"][0], share, start, first))
    if not found:
        return None
    found.sort(key=lambda f: -f[2])
    evidence = [
        Evidence(
            f"{name} ({kind}): {percent(share)} of units output 0 for the whole batch "
            f"(from {percent(start)} at the start; over {percent(DEAD_SHARE)} from step {first})",
            step=first,
            module=name,
            value=share,
        )
        for name, kind, share, start, first in found[:5]
    ]
    critical = found[0][2] >= DEAD_CRITICAL
    return Finding(
        code="dead_units",
        severity="critical" if critical else "warning",
        title=f"Dead ReLU units: {percent(found[0][2])} of {found[0][0] or 'the model'}",
        evidence=tuple(evidence),
        cause=(
            "A ReLU unit whose pre-activation is negative for every input has zero gradient "
            "and never recovers ('dying ReLU'): usually a large update (learning rate too "
            "high, a gradient spike) pushed its bias far negative, or a poor initialisation."
        ),
        fix=(
            "Lower the learning rate or add warmup, clip gradients, use LeakyReLU/GELU/SiLU, "
            "He initialisation, and normalisation before the activation."
        ),
        references=(
            "L. Lu, Y. Shin, Y. Su, G. E. Karniadakis, 'Dying ReLU and initialization: "
            "theory and numerical examples', 2019.",
            "A. L. Maas, A. Y. Hannun, A. Y. Ng, 'Rectifier nonlinearities improve neural "
            "network acoustic models', ICML 2013 (leaky ReLU).",
        ),
    )


def _last_module(history: History) -> str | None:
    """The leaf module that ran last in the latest measured step (an output layer)."""
    modules = history.modules
    if len(modules) == 0:
        return None
    last = modules.where(step=int(np.max(modules["step"])))
    return str(last["module"][-1]) if len(last) else None


def saturated_activations(history: History, context: Context) -> Finding | None:
    """Sigmoid/Tanh layers whose outputs sit where their derivative is nearly zero.

    Median ``saturated_fraction`` (outputs with a local derivative below 1% of its
    maximum) over the second half of the run; fires at :data:`SATURATED_SHARE` (50%). The
    model's last module is left out: a confident output sigmoid saturates by design.
    """
    output = _last_module(history)
    found = []
    for name, rows in by_name(history.modules, "module").items():
        if name == output or np.isnan(rows["saturated_fraction"].astype(np.float64)).all():
            continue
        share = median(_late(rows)["saturated_fraction"])
        if share >= SATURATED_SHARE:
            over = rows["step"][rows["saturated_fraction"] >= SATURATED_SHARE]
            found.append((name, rows["type"][0], share, int(over[0]) if len(over) else None))
    if not found:
        return None
    found.sort(key=lambda f: -f[2])
    evidence = [
        Evidence(
            f"{name} ({kind}): {percent(share)} of outputs saturated (derivative < 1% of its "
            "maximum)" + (f", from step {first}" if first is not None else ""),
            step=first,
            module=name,
            value=share,
        )
        for name, kind, share, first in found[:5]
    ]
    return Finding(
        code="saturated_activations",
        severity="warning",
        title=f"Saturated activations: {percent(found[0][2])} of {found[0][0]}",
        evidence=tuple(evidence),
        cause=(
            "Large pre-activations push sigmoid/tanh into their flat tails, where the "
            "gradient through them is scaled down more than a hundredfold: the layers "
            "below stop learning. Unnormalised inputs, weights that grew, or a too-large "
            "initialisation cause it."
        ),
        fix=(
            "Normalise the inputs and pre-activations (LayerNorm/BatchNorm), use Xavier/"
            "Glorot initialisation, lower the learning rate, or switch to ReLU-family "
            "activations."
        ),
        references=(
            "X. Glorot, Y. Bengio, 'Understanding the difficulty of training deep "
            "feedforward neural networks', AISTATS 2010.",
        ),
    )
