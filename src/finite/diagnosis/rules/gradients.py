"""Rules on gradient magnitudes: explosion, vanishing, and underflow in the format."""

from __future__ import annotations

import math

import numpy as np

from finite.diagnosis.context import Context
from finite.diagnosis.finding import Evidence, Finding
from finite.diagnosis.rules._series import (
    NON_LAYER_TYPES,
    by_name,
    median,
    module_types,
    num,
    owner,
    percent,
    quantile,
    skipped_steps,
    step_rows,
)
from finite.monitor import History

__all__ = [
    "SPIKE_FACTOR",
    "SUBNORMAL_SHARE",
    "UNDERFLOW_SHARE",
    "VANISHING_RATIO",
    "exploding_gradients",
    "fp16_gradient_underflow",
    "suggested_loss_scale",
    "vanishing_gradients",
]

#: float32's smallest normal number: formats with a larger one underflow where it does not.
FLOAT32_MIN_NORMAL = 2.0**-126

#: A gradient norm this many times the median of the (at least 5) steps before it is a
#: spike ...
SPIKE_FACTOR = 10.0
#: ... and so is one this many times the median of the steps around it.
EARLY_SPIKE_FACTOR = 100.0
#: Steps on either side that :data:`EARLY_SPIKE_FACTOR` compares with.
NEIGHBOURS = 10
#: Growth above which an explosion is critical.
CRITICAL_GROWTH = 1000.0
#: Steps whose median is the baseline of a spike.
BASELINE_STEPS = 50

#: Early-layer / late-layer RMS gradient below which gradients vanish (2**-10, about 1e-3).
VANISHING_RATIO = 2.0**-10
#: Fewest weight layers for a vanishing-gradient comparison.
MIN_LAYERS = 3

#: Share of finite non-zero gradient elements that flush to zero in the format.
UNDERFLOW_SHARE = 0.01
#: Share that is subnormal (keeps fewer significant bits, the next to flush).
SUBNORMAL_SHARE = 0.10
#: Binades a suggested loss scale leaves between the largest gradient and the format's max.
SCALE_MARGIN_BITS = 4

_CLIPPING_REFS = (
    "R. Pascanu, T. Mikolov, Y. Bengio, 'On the difficulty of training recurrent neural "
    "networks', ICML 2013.",
    "J. Zhang, T. He, S. Sra, A. Jadbabaie, 'Why gradient clipping accelerates training', "
    "ICLR 2020.",
)


def _gradient_series(history: History) -> tuple[np.ndarray, np.ndarray]:
    """Steps and global gradient norms of steps where a backward ran and the optimizer
    step was not skipped by a loss scaler (its overflows are expected)."""
    rows = step_rows(history)
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    keep = (rows["nonfinite_grads"] >= 0) & ~rows["skipped"]
    return rows["step"][keep], rows["grad_norm"][keep].astype(np.float64)


def _norm_spikes(norms: np.ndarray) -> tuple[list[tuple[int, float, float]], int | None]:
    """Spike indices ``(index, norm, baseline)`` of a gradient-norm series, and the index
    where it turned non-finite right after a spike (None if it did not)."""
    finite = np.isfinite(norms)
    spikes: list[tuple[int, float, float]] = []
    blowup = None
    for i, g in enumerate(norms):
        if not finite[i]:
            if i > 0 and finite[:i].any():
                recent = [j for j, _, _ in spikes if i - j <= 3]
                blowup = i if recent else None
                break  # later norms are consequences
            continue
        past = norms[max(0, i - BASELINE_STEPS) : i][finite[max(0, i - BASELINE_STEPS) : i]]
        lo, hi = max(0, i - NEIGHBOURS), min(len(norms), i + NEIGHBOURS + 1)
        around = np.concatenate([norms[lo:i], norms[i + 1 : hi]])
        around = around[np.isfinite(around)]
        if len(past) >= 5 and median(past) > 0 and g >= SPIKE_FACTOR * median(past):
            spikes.append((i, float(g), median(past)))
        elif len(around) >= 3 and median(around) > 0 and g >= EARLY_SPIKE_FACTOR * median(around):
            spikes.append((i, float(g), median(around)))
    return spikes, blowup


def exploding_gradients(history: History, context: Context) -> Finding | None:
    """The global gradient norm jumped far above its usual size.

    A step's norm is a spike when it is at least :data:`SPIKE_FACTOR` (10) times the
    median of the (at least 5, at most :data:`BASELINE_STEPS`) finite norms before it, or
    :data:`EARLY_SPIKE_FACTOR` (100) times the median of the :data:`NEIGHBOURS` steps on
    either side (which catches an explosion in the first steps, before any baseline).
    A norm that turns non-finite within 3 steps of a spike, or a spike of
    :data:`CRITICAL_GROWTH` (1000) times, makes it critical. Steps a loss scaler skipped
    are left out (their overflow is the scaler's business). The fix quotes a clipping
    threshold: the 90th percentile of the norms outside the spikes.
    """
    steps, norms = _gradient_series(history)
    if len(norms) < 2:
        return None
    found, blowup_index = _norm_spikes(norms)
    if not found:
        return None
    spikes = [(int(steps[i]), g, base, g / base) for i, g, base in found]
    blowup = int(steps[blowup_index]) if blowup_index is not None else None
    first_step, first_norm, base, _ = spikes[0]
    largest = max(spikes, key=lambda s: s[3])
    critical = blowup is not None or largest[3] >= CRITICAL_GROWTH
    spike_indices = {i for i, _, _ in found}
    calm = np.array([g for i, g in enumerate(norms) if i not in spike_indices and math.isfinite(g)])
    if blowup_index is not None:
        calm = np.array([g for i, g in enumerate(norms[:blowup_index]) if i not in spike_indices])
    p50, p90 = median(calm), quantile(calm, 0.9)
    evidence = [
        Evidence(
            f"grad norm {num(first_norm)} at step {first_step}: {num(first_norm / base)}x the "
            "median of the steps around it",
            step=first_step,
            value=first_norm,
            plot="grad_norm",
        ),
    ]
    evidence.append(
        Evidence(
            f"outside the spikes the grad norm has median {num(p50)}, 90th percentile "
            f"{num(p90)} ({len(calm)} steps)",
            value=p50,
            plot="grad_norm",
        )
    )
    if largest[0] != first_step:
        evidence.append(
            Evidence(
                f"largest: {num(largest[1])} at step {largest[0]} ({num(largest[3])}x)",
                step=largest[0],
                value=largest[1],
                plot="grad_norm",
            )
        )
    if len(spikes) > 1:
        evidence.append(
            Evidence(
                f"{len(spikes)} spike steps in all",
                step=first_step,
                value=float(len(spikes)),
                plot="grad_norm",
            )
        )
    if blowup is not None:
        evidence.append(
            Evidence(
                f"the gradient norm became non-finite at step {blowup}",
                step=blowup,
                plot="grad_norm",
            )
        )
    layer = _fastest_growing_parameter(history, first_step)
    if layer is not None:
        name, ratio = layer
        evidence.append(
            Evidence(
                f"largest growth in {name}: {num(ratio)}x its median gradient norm",
                step=first_step,
                module=name,
                value=ratio,
                plot="grad_norm_heatmap",
            )
        )
    threshold = p90 if math.isfinite(p90) and p90 > 0 else base
    return Finding(
        code="exploding_gradients",
        severity="critical" if critical else "warning",
        title=f"Exploding gradients: the gradient norm jumped {num(largest[3])}x"
        + (" and became non-finite" if blowup is not None else ""),
        evidence=tuple(evidence),
        cause=(
            "The gradient grows multiplicatively along the network (or through time in a "
            "recurrent net) when the layer Jacobians' norms exceed 1, and one large step "
            "throws the weights into a region of even larger gradients. A learning rate too "
            "high for the loss surface's curvature has the same signature."
        ),
        fix=(
            f"Clip the gradient norm: finite.clip_grad_norm_(model.parameters(), "
            f"max_norm={threshold:.2g}) (the 90th percentile of the norms outside the "
            "spikes), or let finite.ZClip / finite.AutoClip adapt the threshold; lower the "
            "learning rate or add warmup; for recurrent nets use LSTM/GRU cells or an "
            "orthogonal recurrent initialisation."
        ),
        references=_CLIPPING_REFS,
    )


def _fastest_growing_parameter(history: History, step: int) -> tuple[str, float] | None:
    """The parameter whose gradient norm at ``step`` is largest relative to its median
    over the other steps."""
    best = None
    for name, rows in by_name(history.params, "param").items():
        at = rows["grad_norm"][rows["step"] == step]
        earlier = rows["grad_norm"][rows["step"] != step]
        if len(at) == 0 or not np.isfinite(at[0]):
            continue
        base = median(earlier)
        if not base > 0:
            continue
        ratio = float(at[0] / base)
        if best is None or ratio > best[1]:
            best = (name, ratio)
    return best


def _layer_weights(history: History) -> list[tuple[str, float, int]]:
    """(name, median RMS gradient, first step) of each weight of a layer, in model order.

    A layer weight is a parameter whose name ends in something with ``weight`` in it,
    owned by a module that is not an embedding or a normalisation.
    """
    types = module_types(history)
    skipped = skipped_steps(history)
    layers = []
    for name, rows in by_name(history.params, "param").items():
        if "weight" not in name.rsplit(".", 1)[-1]:
            continue
        if types.get(owner(name)) in NON_LAYER_TYPES:
            continue
        keep = np.isfinite(rows["grad_norm"]) & np.array(
            [int(s) not in skipped for s in rows["step"]], dtype=bool
        )
        if not keep.any():
            continue
        rms = rows["grad_norm"][keep] / np.sqrt(np.maximum(rows["numel"][keep], 1))
        layers.append((name, median(rms), int(rows["step"][keep][0])))
    return layers


def vanishing_gradients(history: History, context: Context) -> Finding | None:
    """Early layers get gradients orders of magnitude smaller than late layers.

    Compares the median RMS gradient (``grad_norm / sqrt(numel)``) of the first layer weight
    with that of the last, in the model's parameter order; embeddings and normalisation
    gains are left out. Fires below :data:`VANISHING_RATIO` (2**-10) with at least
    :data:`MIN_LAYERS` weights. Notes when the early gradients are subnormal in the format.
    """
    layers = _layer_weights(history)
    if len(layers) < MIN_LAYERS:
        return None
    (first, rms_first, step), (last, rms_last, _) = layers[0], layers[-1]
    if not (rms_last > 0) or math.isnan(rms_first):
        return None
    ratio = rms_first / rms_last
    if ratio >= VANISHING_RATIO:
        return None
    per_layer = ratio ** (1.0 / (len(layers) - 1)) if ratio > 0 else 0.0
    evidence = [
        Evidence(
            f"RMS gradient of {first}: {num(rms_first)}, of {last}: {num(rms_last)} "
            f"(ratio {num(ratio)})",
            step=step,
            module=first,
            value=ratio,
            plot="grad_norm_heatmap",
        ),
        Evidence(
            f"the gradient shrinks about {num(1 / per_layer)}x per layer over {len(layers)} layers"
            if per_layer
            else f"{first}'s gradient is exactly zero on most measured steps",
            step=step,
            value=per_layer,
            plot="grad_norm_heatmap",
        ),
    ]
    fmt = context.format
    if fmt is not None and rms_first < fmt.min_normal:
        evidence.append(
            Evidence(
                f"early-layer gradients ({num(rms_first)}) are below {fmt.name}'s smallest "
                f"normal number {num(fmt.min_normal)}: they lose bits and flush to zero",
                module=first,
                value=rms_first,
                plot="histograms",
            )
        )
    # In a format with less range than float32 and no loss scaling, the likelier cause is
    # the format: the gradients flushed to zero on their way down, whatever the layers do.
    unscaled = math.isnan(median(step_rows(history)["loss_scale"]))
    underflow = (
        fmt is not None
        and fmt.min_normal > FLOAT32_MIN_NORMAL
        and rms_first < fmt.min_normal
        and unscaled
    )
    saturated = _saturated_modules(history)
    if saturated:
        evidence.append(
            Evidence(
                "saturated activations: "
                + ", ".join(f"{m} {percent(f)}" for m, f in saturated[:4]),
                module=saturated[0][0],
                value=saturated[0][1],
            )
        )
    return Finding(
        code="vanishing_gradients",
        severity="warning",
        title=(
            f"Vanishing gradients: early layers get {num(ratio)}x the gradient of the last"
            if ratio > 0
            else "Vanishing gradients: the first layer gets no gradient at all"
        ),
        evidence=tuple(evidence),
        cause=(
            f"The early layers' gradients are below {fmt.name}'s smallest normal number "
            "and no loss scaling is in use: they flush to zero in the backward pass (see "
            "fp16_gradient_underflow), so the depth of the model need not be the cause."
            if underflow and fmt is not None
            else "Backpropagation multiplies the gradient by every layer's Jacobian; "
            "sigmoid (derivative at most 0.25), saturated tanh and too-small weights "
            "shrink it geometrically with depth, so the early layers barely learn."
        ),
        fix=(
            "Scale the loss first (finite.LossScaler; the fp16_gradient_underflow finding "
            "quotes a scale). If the early layers still get orders of magnitude less "
            "gradient with scaling, use ReLU-family activations with He/Kaiming "
            "initialisation, normalisation and residual connections."
            if underflow
            else "Use ReLU-family activations (ReLU, GELU, SiLU) with He/Kaiming "
            "initialisation, add normalisation (LayerNorm/BatchNorm) and residual "
            "connections; for recurrent nets use LSTM/GRU cells."
        ),
        references=(
            "S. Hochreiter, Y. Bengio, P. Frasconi, J. Schmidhuber, 'Gradient flow in "
            "recurrent nets: the difficulty of learning long-term dependencies', 2001.",
            "X. Glorot, Y. Bengio, 'Understanding the difficulty of training deep "
            "feedforward neural networks', AISTATS 2010.",
            "K. He, X. Zhang, S. Ren, J. Sun, 'Delving deep into rectifiers', ICCV 2015.",
        ),
    )


def _saturated_modules(history: History, share: float = 0.5) -> list[tuple[str, float]]:
    out = []
    for name, rows in by_name(history.modules, "module").items():
        value = median(rows["saturated_fraction"])
        if value >= share:
            out.append((name, value))
    return sorted(out, key=lambda m: -m[1])


def suggested_loss_scale(largest_gradient: float, fmt_max: float) -> float:
    """The largest power of two that keeps ``largest_gradient * scale`` at least
    :data:`SCALE_MARGIN_BITS` binades below ``fmt_max`` (between 1 and 2**24)."""
    if not largest_gradient > 0 or not math.isfinite(largest_gradient):
        return 2.0**16
    exponent = math.floor(math.log2(fmt_max / largest_gradient)) - SCALE_MARGIN_BITS
    return 2.0 ** min(max(exponent, 0), 24)


def fp16_gradient_underflow(history: History, context: Context) -> Finding | None:
    """A share of the gradients flushes to zero (or is subnormal) in the training format.

    Per measured step, the element-weighted share of finite non-zero gradient elements
    that round to 0 (``grad_underflow_fraction``) or to a subnormal
    (``grad_subnormal_fraction``) in the monitor's format, measured on the gradient as
    stored (scaled, with a loss scaler); their medians over the steps must reach
    :data:`UNDERFLOW_SHARE` (1%) or :data:`SUBNORMAL_SHARE` (10%). Float16 is the usual
    case; float8 formats underflow too, while bfloat16 and float32 have float32's range
    and almost never do. The fix suggests a loss scale from the largest gradient seen.
    """
    fmt = context.format
    params = history.params
    if fmt is None or len(params) == 0:
        return None
    skipped = skipped_steps(history)
    shares: dict[int, list[float]] = {}
    largest = 0.0
    worst: dict[str, float] = {}
    for name, rows in by_name(params, "param").items():
        under, sub = rows["grad_underflow_fraction"], rows["grad_subnormal_fraction"]
        absmax = rows["grad_absmax"]
        for step, u, s, n, a in zip(rows["step"], under, sub, rows["numel"], absmax, strict=True):
            if int(step) in skipped or math.isnan(u):
                continue
            totals = shares.setdefault(int(step), [0.0, 0.0, 0.0])
            totals[0] += u * n
            totals[1] += s * n
            totals[2] += n
            if math.isfinite(a):
                largest = max(largest, float(a))
        worst[name] = median(under + sub)
    if not shares:
        return None
    steps = sorted(shares)
    under_share = np.array([shares[s][0] / shares[s][2] for s in steps if shares[s][2]])
    sub_share = np.array([shares[s][1] / shares[s][2] for s in steps if shares[s][2]])
    u, s = median(under_share), median(sub_share)
    if not (u >= UNDERFLOW_SHARE or s >= SUBNORMAL_SHARE):
        return None
    first = steps[0]  # the rule judges the run as a whole, from its first measured step
    evidence = [
        Evidence(
            f"{percent(u)} of the non-zero gradient elements would flush to zero in {fmt.name} "
            f"and {percent(s)} are subnormal (medians over {len(steps)} measured steps)"
            if u > 0
            else f"{percent(s)} of the non-zero gradient elements are subnormal in {fmt.name} "
            f"(medians over {len(steps)} measured steps); gradients computed in {fmt.name} "
            "have already lost the ones that flushed: they are exact zeros, not counted here",
            step=first,
            value=u,
            plot="histograms",
        )
    ]
    for name in sorted(worst, key=lambda n: -worst[n] if not math.isnan(worst[n]) else 0)[:3]:
        if worst[name] > 0:
            evidence.append(
                Evidence(
                    f"{name}: {percent(worst[name])} of its gradient underflows or is subnormal",
                    step=first,
                    module=name,
                    value=worst[name],
                    plot="histograms",
                )
            )
    zeros = _zero_gradient_share(history)
    if zeros is not None and zeros > 0.01:
        evidence.append(
            Evidence(
                f"{percent(zeros)} of the gradient elements are exactly zero in the histograms",
                value=zeros,
                plot="histograms",
            )
        )
    scales = step_rows(history)["loss_scale"]
    current = median(scales)
    scale = suggested_loss_scale(largest, fmt.max)
    if math.isnan(current):
        fix = (
            f"Scale the loss: scaler = finite.LossScaler(init_scale={scale:g}); "
            "scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update(). "
            f"{scale:g} keeps the largest gradient seen ({num(largest)}) {SCALE_MARGIN_BITS} "
            f"binades below the {fmt.name} maximum {num(fmt.max)}. Or train in bfloat16, "
            "which has float32's range."
        )
        cause_scale = "No loss scaling is in use, so"
    else:
        evidence.append(
            Evidence(
                f"loss scale median {num(current)}",
                value=current,
                plot="loss_scale",
            )
        )
        fix = (
            f"Raise the loss scale (the largest gradient seen, {num(largest)}, leaves room "
            f"for {scale:g}): LossScaler(init_scale={scale:g}, strategy='headroom') keeps it "
            f"{SCALE_MARGIN_BITS} binades below the maximum; if the gradients span more "
            f"binades than {fmt.name} has, train in bfloat16."
        )
        cause_scale = f"Even at a loss scale of {num(current)},"
    return Finding(
        code="fp16_gradient_underflow",
        severity="warning",
        title=f"Gradients underflow in {fmt.name}: "
        + (f"{percent(u)} flush to zero, " if u >= UNDERFLOW_SHARE else "")
        + f"{percent(s)} are subnormal",
        evidence=tuple(evidence),
        cause=(
            f"{cause_scale} gradients smaller than {fmt.name}'s smallest subnormal "
            f"({num(fmt.min_subnormal)}) round to zero and those below its smallest normal "
            f"({num(fmt.min_normal)}) keep fewer bits: those weights stop learning."
        ),
        fix=fix,
        references=("P. Micikevicius et al., 'Mixed Precision Training', ICLR 2018.",),
    )


def _zero_gradient_share(history: History) -> float | None:
    """Share of gradient elements that are exactly zero, from the latest histograms."""
    histograms = history.histograms
    if len(histograms) == 0:
        return None
    grads = histograms.where(tensor="grad")
    if len(grads) == 0:
        return None
    last = grads.where(step=int(np.max(grads["step"])))
    counts = np.asarray(last["counts"], dtype=np.float64)
    total = counts.sum()
    return float(counts[:, 0].sum() / total) if total else None
