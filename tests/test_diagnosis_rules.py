"""Each diagnosis rule on synthetic histories: one with the symptom, one healthy.

Histories are built directly (``History.extend`` with the records a monitor writes), so
every number a rule sees is chosen here and the expected verdict follows from the rule's
documented thresholds.
"""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finite.diagnosis import Context, Finding
from finite.diagnosis import rules as R
from finite.formats import get_format
from finite.monitor import HistogramBins, History, NonfiniteEvent, TensorSummary

STEPS = 120
LAYERS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
NUMEL = {"0.weight": 256, "0.bias": 16, "2.weight": 256, "2.bias": 16, "4.weight": 16, "4.bias": 1}


def _value(spec, i):
    return spec(i) if callable(spec) else spec


def make_history(
    steps=STEPS,
    *,
    fmt="float32",
    loss=None,
    grad_norm=None,
    skipped=None,
    loss_scale=None,
    nonfinite_grads=None,
    params=None,
    modules=None,
    events=(),
    seed=0,
):
    """A healthy run unless told otherwise.

    Loss falls from 2 to about 0.1 with 5% minibatch noise, the gradient norm is about 1
    with 20% noise; three Linear layers with a ReLU and a Tanh between them; updates of
    1e-3 of the weights. ``params``/``modules`` map a name to column overrides (values or
    functions of the step).
    """
    rng = np.random.default_rng(seed)
    noise = 1 + 0.05 * rng.standard_normal(steps)
    gnoise = np.exp(0.2 * rng.standard_normal(steps))
    param_columns = {
        name: {
            "numel": NUMEL[name],
            "grad_norm": 0.1 * math.sqrt(NUMEL[name]),
            "grad_absmax": 0.3,
            "grad_nonfinite": 0,
            "grad_underflow_fraction": 0.0,
            "grad_subnormal_fraction": 0.0,
            "weight_norm": 0.5 * math.sqrt(NUMEL[name]),
            "update_norm": 5e-4 * math.sqrt(NUMEL[name]),
            "update_ratio": 1e-3,
        }
        for name in LAYERS
    }
    for name, overrides in (params or {}).items():
        param_columns.setdefault(name, dict(param_columns["0.weight"])).update(overrides)
    module_columns = {
        "0": {"type": "Linear", "dead_fraction": math.nan, "saturated_fraction": math.nan},
        "1": {"type": "ReLU", "dead_fraction": 0.1, "saturated_fraction": math.nan},
        "2": {"type": "Linear", "dead_fraction": math.nan, "saturated_fraction": math.nan},
        "3": {"type": "Tanh", "dead_fraction": math.nan, "saturated_fraction": 0.05},
        "4": {"type": "Linear", "dead_fraction": math.nan, "saturated_fraction": math.nan},
    }
    for columns in module_columns.values():
        columns.update(calls=1, numel=512, absmax=3.0, rms=1.0, nonfinite=0)
    for name, overrides in (modules or {}).items():
        module_columns.setdefault(name, dict(module_columns["0"])).update(overrides)
    log2_max = math.log2(get_format(fmt).max)
    records = []
    for i in range(steps):
        record = {
            "step": i,
            "rank": 0,
            "loss": _value(loss, i)
            if loss is not None
            else 0.1 + 1.9 * math.exp(-i / 15) * noise[i],
            "loss_scale": _value(loss_scale, i) if loss_scale is not None else math.nan,
            "skipped": bool(_value(skipped, i)) if skipped is not None else False,
            "measured": True,
            "grad_norm": _value(grad_norm, i) if grad_norm is not None else float(gnoise[i]),
            "nonfinite_grads": _value(nonfinite_grads, i) if nonfinite_grads is not None else 0,
            "params": {
                name: {k: _value(v, i) for k, v in columns.items()}
                for name, columns in param_columns.items()
            },
            "modules": {},
        }
        for path, columns in module_columns.items():
            row = {k: _value(v, i) for k, v in columns.items()}
            absmax = row["absmax"]
            if absmax == 0:
                headroom = math.inf
            elif absmax > 0 and math.isfinite(absmax):
                headroom = log2_max - math.log2(absmax)
            else:
                headroom = math.nan
            row.setdefault("headroom_bits", headroom)
            record["modules"][path] = row
        records.append(record)
    history = History(fmt, HistogramBins.for_format(get_format(fmt)))
    history.extend(records, events)
    return history


def context(fmt="float32", **fields):
    return Context(format=get_format(fmt), **fields)


HEALTHY = make_history()
HEALTHY_FP16 = make_history(fmt="float16", loss_scale=2.0**16)


@pytest.mark.parametrize("rule", R.RULES, ids=lambda r: r.__name__)
def test_rule_is_silent_on_a_healthy_float32_history(rule):
    assert rule(HEALTHY, context()) is None


@pytest.mark.parametrize("rule", R.RULES, ids=lambda r: r.__name__)
def test_rule_is_silent_on_a_healthy_float16_history_with_loss_scaling(rule):
    assert rule(HEALTHY_FP16, context("float16", min_loss_scale=1.0)) is None


@pytest.mark.parametrize("rule", R.RULES, ids=lambda r: r.__name__)
def test_rule_is_silent_on_an_empty_history(rule):
    assert rule(History("float32"), context()) is None


@pytest.mark.parametrize("rule", R.RULES, ids=lambda r: r.__name__)
def test_rule_reads_a_history_without_format_or_events(rule):
    history = make_history(steps=30)
    history.format = None
    assert rule(history, Context()) is None


# ------------------------------------------------------------------ nonfinite


FINITE_INPUT = (TensorSummary(64, 0, -2.0, 3.0),)


def _forward_event(step, origin, outputs, inputs=FINITE_INPUT):
    return NonfiniteEvent(step, "forward", origin, "Module", inputs=inputs, outputs=outputs)


def test_nonfinite_input_data_fires_on_an_input_event():
    event = NonfiniteEvent(
        7, "input", "", "input", inputs=(TensorSummary(64, 3, math.nan, math.nan),)
    )
    finding = R.nonfinite_input_data(make_history(events=[event]), context())
    assert (finding.code, finding.severity, finding.first_step) == (
        "nonfinite_input_data",
        "critical",
        7,
    )


def test_nonfinite_input_data_ignores_forward_events():
    event = _forward_event(7, "0", (TensorSummary(64, -1, math.nan, math.nan),))
    assert R.nonfinite_input_data(make_history(events=[event]), context()) is None


def _loss_with_bad_step(bad_step, value):
    return lambda i: value if i >= bad_step else 1.0 / (1 + i)


def test_nonfinite_loss_names_the_origin_and_log_of_zero_for_minus_inf():
    event = _forward_event(40, "head.logprob", (TensorSummary(64, 2, -math.inf, -0.1),))
    history = make_history(loss=_loss_with_bad_step(40, math.inf), events=[event])
    finding = R.nonfinite_loss(history, context())
    assert finding.severity == "critical" and finding.first_step == 40
    assert "log of 0" in finding.title and "head.logprob" in finding.title
    assert any(e.module == "head.logprob" for e in finding.evidence)
    assert "log_softmax" in finding.fix


@pytest.mark.parametrize(
    ("outputs", "inputs", "expected"),
    [
        ((TensorSummary(8, -1, math.nan, math.nan),), (TensorSummary(8, 0, 0.0, 1.0),), "0/0"),
        ((TensorSummary(8, 1, 0.0, math.inf),), (TensorSummary(8, 0, -1.0, 30.0),), "exp overflow"),
        ((TensorSummary(8, 1, 0.0, math.inf),), (TensorSummary(8, 0, -1.0, 1e4),), "overflow"),
        ((TensorSummary(8, 1, 0.0, math.inf),), (TensorSummary(8, 0, 0.0, 1.0),), "division by 0"),
        ((TensorSummary(8, 1, -math.inf, 0.0),), (TensorSummary(8, 0, 0.0, 1.0),), "log of 0"),
        ((TensorSummary(8, 1, 0.0, math.inf),), (TensorSummary(8, 0, 0.0, 6e4),), "explosion"),
    ],
)
def test_mechanism_reads_the_non_finite_value_and_the_inputs_in_float16(outputs, inputs, expected):
    # ln(65504) = 11.09 and sqrt(65504) = 255.9 separate exp overflow from overflow.
    event = _forward_event(3, "m", outputs, inputs)
    assert R.nonfinite.mechanism(event, get_format("float16")) == expected


def test_mechanism_reads_a_flag_only_output_from_the_loss_value():
    event = _forward_event(3, "", (TensorSummary(8, -1, None, None),))
    fmt = get_format("float16")
    assert R.nonfinite.mechanism(event, fmt, value=math.inf) == "log of 0"
    assert R.nonfinite.mechanism(event, fmt, value=math.nan) == "0/0"


def test_mechanism_is_explosion_after_a_hundredfold_growth():
    event = _forward_event(3, "m", (TensorSummary(8, 1, 0.0, math.inf),))
    assert R.nonfinite.mechanism(event, get_format("float32"), growth=150.0) == "explosion"


def test_nonfinite_loss_blames_growth_before_it_on_an_explosion():
    loss = lambda i: 1.0 if i < 50 else (10.0 ** (i - 50) if i < 55 else math.nan)  # noqa: E731
    finding = R.nonfinite_loss(make_history(loss=loss), context())
    assert finding.first_step == 55 and "explosion" in finding.title


def test_nonfinite_loss_treats_nan_without_any_recorded_loss_as_missing():
    assert R.nonfinite_loss(make_history(loss=math.nan), context()) is None


def test_nonfinite_gradients_fires_for_a_backward_origin_with_a_finite_loss():
    event = NonfiniteEvent(30, "backward", "norm", "Norm", parameters=("0.weight",))
    history = make_history(
        nonfinite_grads=lambda i: 1 if i == 30 else 0,
        grad_norm=lambda i: math.nan if i == 30 else 1.0,
        events=[event],
    )
    finding = R.nonfinite_gradients(history, context())
    assert finding.first_step == 30 and finding.severity == "critical"
    assert any(e.module == "norm" for e in finding.evidence)
    assert "safe_sqrt" in finding.fix


def test_nonfinite_gradients_leaves_steps_a_loss_scaler_skipped_alone():
    history = make_history(
        nonfinite_grads=lambda i: 1 if i == 30 else 0,
        grad_norm=lambda i: math.inf if i == 30 else 1.0,
        skipped=lambda i: i == 30,
        loss_scale=2.0**15,
    )
    assert R.nonfinite_gradients(history, context()) is None


def test_nonfinite_weights_fires_when_an_update_made_a_weight_nan():
    history = make_history(
        params={
            "2.weight": {
                "update_norm": lambda i: math.nan if i == 60 else 8e-3,
                "weight_norm": lambda i: math.nan if i > 60 else 8.0,
            }
        }
    )
    finding = R.nonfinite_weights(history, context())
    assert finding.first_step == 61 and finding.evidence[0].module == "2.weight"


def test_nonfinite_weights_fires_on_the_inf_nan_bin_of_a_weight_histogram():
    history = make_history(steps=30)
    bins = history.bins
    counts = [0] * bins.nbins
    counts[-1] = 3  # inf and NaN
    history.extend(
        [{"step": 30, "histograms": {"0.weight": {"weight": counts, "grad": [0] * bins.nbins}}}]
    )
    finding = R.nonfinite_weights(history, context())
    assert finding.first_step == 30 and "0.weight" in finding.evidence[0].text


def test_nonfinite_weights_ignores_steps_without_an_optimizer_step():
    history = make_history(
        params={name: {"weight_norm": math.nan, "update_norm": math.nan} for name in LAYERS}
    )
    assert R.nonfinite_weights(history, context()) is None


# ------------------------------------------------------------------ gradients


def _spiky_norms(spike_step, factor):
    rng = np.random.default_rng(1)
    base = np.exp(0.2 * rng.standard_normal(STEPS))
    return lambda i: float(base[i] * (factor if i == spike_step else 1.0))


def test_exploding_gradients_fires_on_a_spike_and_quotes_the_90th_percentile():
    norms = [_spiky_norms(70, 50.0)(i) for i in range(STEPS)]
    finding = R.exploding_gradients(make_history(grad_norm=lambda i: norms[i]), context())
    assert finding.severity == "warning" and finding.first_step == 70
    calm = [g for i, g in enumerate(norms) if i != 70]
    assert f"max_norm={np.quantile(calm, 0.9):.2g}" in finding.fix


def test_exploding_gradients_is_critical_when_the_norm_then_turns_non_finite():
    norm = lambda i: 1.0 if i < 50 else (1e3 if i == 50 else math.inf)  # noqa: E731
    finding = R.exploding_gradients(make_history(grad_norm=norm), context())
    assert finding.severity == "critical" and finding.first_step == 50
    assert "non-finite" in finding.title


def test_exploding_gradients_catches_an_explosion_at_the_first_steps():
    norm = lambda i: 3e4 if i < 2 else 1.0  # noqa: E731
    finding = R.exploding_gradients(make_history(grad_norm=norm), context())
    assert finding.first_step == 0 and finding.severity == "critical"


def test_exploding_gradients_ignores_a_steady_decrease_of_the_norm():
    # Converging runs: the norm falls 1000x over the run, 6% per step at most.
    norm = lambda i: 10.0 * 0.94**i  # noqa: E731
    assert R.exploding_gradients(make_history(grad_norm=norm), context()) is None


def test_exploding_gradients_ignores_skipped_overflow_steps():
    history = make_history(
        grad_norm=lambda i: math.inf if i % 40 == 5 else 1.0,
        skipped=lambda i: i % 40 == 5,
        loss_scale=2.0**15,
    )
    assert R.exploding_gradients(history, context()) is None


def _vanishing_params(ratio):
    # First layer's RMS gradient `ratio` times the last layer's.
    return {
        "0.weight": {"grad_norm": ratio * math.sqrt(256)},
        "2.weight": {"grad_norm": math.sqrt(ratio) * math.sqrt(256)},
        "4.weight": {"grad_norm": 1.0 * math.sqrt(16)},
    }


def test_vanishing_gradients_fires_below_two_to_the_minus_ten():
    finding = R.vanishing_gradients(make_history(params=_vanishing_params(1e-4)), context())
    assert finding.code == "vanishing_gradients" and finding.evidence[0].module == "0.weight"
    assert finding.evidence[0].value == pytest.approx(1e-4)


def test_vanishing_gradients_says_a_zero_first_layer_gradient_gets_nothing_not_inf():
    finding = R.vanishing_gradients(make_history(params=_vanishing_params(0.0)), context())
    assert finding.title == "Vanishing gradients: the first layer gets no gradient at all"
    assert "exactly zero" in finding.evidence[1].text
    assert "inf" not in finding.evidence[1].text


def test_vanishing_gradients_ignores_a_ratio_above_the_threshold():
    assert R.vanishing_gradients(make_history(params=_vanishing_params(2e-3)), context()) is None


def test_vanishing_gradients_leaves_embeddings_out():
    params = {"emb.weight": {"numel": 100_000, "grad_norm": 1e-3}}
    modules = {"emb": {"type": "Embedding"}}
    history = make_history(params=params, modules=modules)
    assert R.vanishing_gradients(history, context()) is None


def test_vanishing_gradients_notes_subnormal_early_gradients_in_float16():
    # RMS 1e-6 in the first layer, below float16's smallest normal 6.1e-5; 1e-2 in the last.
    params = {
        "0.weight": {"grad_norm": 1e-6 * math.sqrt(256)},
        "2.weight": {"grad_norm": 1e-4 * math.sqrt(256)},
        "4.weight": {"grad_norm": 1e-2 * math.sqrt(16)},
    }
    finding = R.vanishing_gradients(make_history(fmt="float16", params=params), context("float16"))
    assert any("smallest normal" in e.text for e in finding.evidence)
    # Unscaled float16: the format, not the depth, is the likelier cause.
    assert "flush to zero" in finding.cause
    assert finding.fix.startswith("Scale the loss")


def test_vanishing_gradients_in_float32_blames_depth_not_the_format():
    finding = R.vanishing_gradients(make_history(params=_vanishing_params(1e-4)), context())
    assert "Jacobian" in finding.cause
    assert finding.fix.startswith("Use ReLU-family")


def _underflowing(under, sub):
    return {
        name: {"grad_underflow_fraction": under, "grad_subnormal_fraction": sub} for name in LAYERS
    }


def test_fp16_gradient_underflow_fires_and_suggests_a_headroom_loss_scale():
    params = _underflowing(0.2, 0.3)
    params["4.weight"]["grad_absmax"] = 0.3
    finding = R.fp16_gradient_underflow(
        make_history(fmt="float16", params=params), context("float16")
    )
    assert finding.severity == "warning" and "20%" in finding.title
    # Largest power of two keeping 0.3 * S four binades below 65504: 2**(17 - 4).
    expected = 2.0 ** (math.floor(math.log2(65504 / 0.3)) - 4)
    assert expected == 2.0**13
    assert f"init_scale={expected:g}" in finding.fix


def test_fp16_gradient_underflow_fires_on_subnormal_gradients_alone():
    history = make_history(fmt="float16", params=_underflowing(0.0, 0.4))
    finding = R.fp16_gradient_underflow(history, context("float16"))
    assert finding is not None and "40% are subnormal" in finding.title
    # Nothing left to flush: the evidence says why, not "0% would flush to zero".
    assert "would flush" not in finding.evidence[0].text
    assert "exact zeros" in finding.evidence[0].text


def test_fp16_gradient_underflow_ignores_a_few_subnormal_gradients():
    history = make_history(fmt="float16", params=_underflowing(0.002, 0.05))
    assert R.fp16_gradient_underflow(history, context("float16")) is None


def test_fp16_gradient_underflow_with_a_scaler_asks_for_a_larger_scale():
    history = make_history(fmt="float16", params=_underflowing(0.2, 0.3), loss_scale=8.0)
    finding = R.fp16_gradient_underflow(history, context("float16"))
    assert "Raise the loss scale" in finding.fix and "8" in finding.cause


@pytest.mark.parametrize(("under", "sub"), [(0.2, 0.0), (0.0, 0.5)])
def test_suggested_loss_scale_is_a_power_of_two_within_bounds(under, sub):
    for largest in (1e-12, 1e-3, 0.3, 100.0, 1e6):
        scale = R.gradients.suggested_loss_scale(largest, 65504.0)
        assert 1.0 <= scale <= 2.0**24 and math.log2(scale).is_integer()
        if scale > 1.0:
            assert largest * scale <= 65504.0 / 16


# ------------------------------------------------------------------ loss curve


def test_loss_plateau_fires_when_the_loss_never_moves():
    rng = np.random.default_rng(3)
    flat = 0.69 * (1 + 0.01 * rng.standard_normal(STEPS))
    finding = R.loss_plateau(make_history(loss=lambda i: float(flat[i])), context())
    assert finding.code == "loss_plateau" and finding.first_step == 0


def test_loss_plateau_attaches_saturation_evidence():
    modules = {"3": {"saturated_fraction": 0.9}}
    history = make_history(loss=0.69, modules=modules)
    finding = R.loss_plateau(history, context())
    assert any(e.module == "3" for e in finding.evidence) and "saturated" in finding.cause


def test_loss_plateau_ignores_a_run_that_converged_and_levelled_off():
    loss = lambda i: max(0.05, 2.0 - 0.05 * i)  # noqa: E731
    assert R.loss_plateau(make_history(loss=loss), context()) is None


def test_loss_plateau_needs_thirty_steps():
    assert R.loss_plateau(make_history(steps=25, loss=0.69), context()) is None


def test_loss_oscillation_fires_on_a_period_two_alternation():
    loss = lambda i: 1.0 + 0.3 * (-1) ** i  # noqa: E731
    finding = R.loss_oscillation(make_history(loss=loss), context(learning_rate=0.1))
    assert finding.code == "loss_oscillation" and "oscillates" in finding.title
    assert "0.033-0.01" in finding.fix


def test_loss_oscillation_fires_on_a_spike_that_persists():
    loss = lambda i: 5.0 if 60 <= i < 66 else 1.0 / (1 + 0.02 * i)  # noqa: E731
    finding = R.loss_oscillation(make_history(loss=loss), context())
    assert finding.first_step == 60 and "spike" in finding.title.lower()


def test_loss_oscillation_ignores_single_outlier_minibatches():
    loss = lambda i: 5.0 if i % 17 == 9 else 1.0 / (1 + 0.02 * i)  # noqa: E731
    assert R.loss_oscillation(make_history(loss=loss), context()) is None


def test_loss_oscillation_ignores_independent_noise():
    rng = np.random.default_rng(4)
    noisy = 0.5 + 0.3 * rng.exponential(size=300)
    history = make_history(steps=300, loss=lambda i: float(noisy[i]))
    assert R.loss_oscillation(history, context()) is None


def test_divergence_after_progress_fires_when_the_loss_climbs_back_for_good():
    loss = lambda i: 2.0 * 0.95**i if i < 60 else 2.0  # noqa: E731
    finding = R.divergence_after_progress(make_history(loss=loss), context())
    assert finding.severity == "critical"
    assert 60 <= finding.first_step <= 66


def test_divergence_after_progress_fires_when_the_loss_turns_non_finite():
    loss = lambda i: 2.0 * 0.95**i if i < 80 else math.nan  # noqa: E731
    finding = R.divergence_after_progress(make_history(loss=loss), context())
    assert finding.first_step == 80


def test_divergence_after_progress_ignores_a_spike_that_recovers():
    loss = lambda i: 5.0 if 60 <= i < 63 else 2.0 * 0.97**i  # noqa: E731
    assert R.divergence_after_progress(make_history(loss=loss), context()) is None


def test_divergence_after_progress_ignores_noise_without_progress():
    rng = np.random.default_rng(5)
    noisy = 0.6 * (1 + 0.15 * rng.standard_normal(STEPS))
    history = make_history(loss=lambda i: float(noisy[i]))
    assert R.divergence_after_progress(history, context()) is None


# ------------------------------------------------------------------ activations


def test_activation_overflow_risk_fires_within_four_bits_of_float16_max():
    modules = {"2": {"absmax": lambda i: 500.0 + 50.0 * i}}  # reaches 6450 = 65504 / 2**3.3
    finding = R.activation_overflow_risk(
        make_history(fmt="float16", modules=modules), context("float16")
    )
    assert finding.severity == "warning" and finding.evidence[0].module == "2"
    first = next(i for i in range(STEPS) if math.log2(65504 / (500 + 50 * i)) < 4)
    assert finding.first_step == first


def test_activation_overflow_risk_ignores_the_same_values_in_bfloat16():
    modules = {"2": {"absmax": 6000.0}}
    history = make_history(fmt="bfloat16", modules=modules)
    assert R.activation_overflow_risk(history, context("bfloat16")) is None


def test_activation_overflow_risk_is_critical_beyond_the_range():
    # A float32 run measured against float16: 1e5 would overflow.
    modules = {"2": {"absmax": 1e5}}
    history = make_history(fmt="float16", modules=modules)
    assert R.activation_overflow_risk(history, context("float16")).severity == "critical"


def test_dead_units_fires_when_most_relu_units_die():
    modules = {"1": {"dead_fraction": lambda i: 0.1 if i < 40 else 0.8}}
    finding = R.dead_units(make_history(modules=modules), context())
    assert finding.severity == "warning" and finding.first_step == 40
    assert finding.evidence[0].module == "1"


def test_dead_units_is_critical_when_the_whole_layer_is_dead():
    finding = R.dead_units(make_history(modules={"1": {"dead_fraction": 1.0}}), context())
    assert finding.severity == "critical"


def test_dead_units_ignores_units_that_died_early_and_recovered():
    modules = {"1": {"dead_fraction": lambda i: 0.9 if i < 20 else 0.1}}
    assert R.dead_units(make_history(modules=modules), context()) is None


def test_saturated_activations_fires_on_a_hidden_tanh():
    finding = R.saturated_activations(
        make_history(modules={"3": {"saturated_fraction": 0.7}}), context()
    )
    assert finding.evidence[0].module == "3"


def test_saturated_activations_ignores_the_output_sigmoid():
    modules = {"5": {"type": "Sigmoid", "saturated_fraction": 0.95}}
    assert R.saturated_activations(make_history(modules=modules), context()) is None


# ------------------------------------------------------------------ precision


def test_loss_scale_collapse_fires_when_steps_skip_at_the_minimum_scale():
    scale = lambda i: max(1.0, 2.0 ** (16 - i // 2))  # noqa: E731
    event = NonfiniteEvent(100, "backward", "attn", "Attention", parameters=("2.weight",))
    history = make_history(
        loss_scale=scale,
        skipped=lambda i: i % 2 == 1 or i > 40,
        grad_norm=lambda i: math.inf if (i % 2 == 1 or i > 40) else 1.0,
        events=[event],
    )
    finding = R.loss_scale_collapse(history, context(min_loss_scale=1.0))
    assert finding.severity == "critical"
    assert any("2.weight" in e.text for e in finding.evidence)


def test_loss_scale_collapse_warns_on_frequent_skips_above_the_minimum():
    history = make_history(loss_scale=2.0**12, skipped=lambda i: i % 10 == 3)
    finding = R.loss_scale_collapse(history, context(min_loss_scale=1.0))
    assert finding.severity == "warning" and finding.first_step == 3


def test_loss_scale_collapse_ignores_the_initial_calibration():
    # GradScaler-style start: 2**24 overflows six times, then the scale holds.
    history = make_history(
        loss_scale=lambda i: 2.0 ** max(18, 24 - i), skipped=lambda i: i < 6 or i == 90
    )
    assert R.loss_scale_collapse(history, context(min_loss_scale=1.0)) is None


def test_loss_scale_collapse_is_critical_when_no_step_was_ever_taken():
    history = make_history(steps=30, loss_scale=lambda i: max(1.0, 2.0 ** (16 - i)), skipped=True)
    assert R.loss_scale_collapse(history, context()).severity == "critical"


def test_loss_scale_collapse_needs_a_loss_scale():
    history = make_history(skipped=lambda i: i % 2 == 0)
    assert R.loss_scale_collapse(history, context()) is None


def _bf16_weights(names=LAYERS):
    return {name: get_format("bfloat16") for name in names}


def test_bf16_update_swamping_fires_below_half_the_bfloat16_epsilon():
    # eps(bfloat16) / 2 = 2**-8 = 0.0039; updates of 1e-3 of the weight round away.
    history = make_history(fmt="bfloat16")
    finding = R.bf16_update_swamping(history, context("bfloat16", weight_formats=_bf16_weights()))
    assert finding.severity == "warning" and "compensated" in finding.fix


def test_bf16_update_swamping_ignores_updates_above_half_an_ulp():
    params = {name: {"update_ratio": 0.01} for name in LAYERS}
    history = make_history(fmt="bfloat16", params=params)
    assert (
        R.bf16_update_swamping(history, context("bfloat16", weight_formats=_bf16_weights())) is None
    )


def test_bf16_update_swamping_ignores_float32_master_weights():
    # bfloat16 autocast: the monitor's format is bfloat16, the weights are float32.
    history = make_history(fmt="bfloat16")
    weights = {name: get_format("float32") for name in LAYERS}
    assert R.bf16_update_swamping(history, context("bfloat16", weight_formats=weights)) is None


def test_bf16_update_swamping_is_info_when_the_weight_dtype_is_unknown():
    finding = R.bf16_update_swamping(make_history(fmt="bfloat16"), context("bfloat16"))
    assert finding.severity == "info" and "model=" in finding.fix


def test_bf16_update_swamping_is_a_warning_when_updates_are_exactly_zero():
    params = {name: {"update_ratio": 0.0, "update_norm": 0.0} for name in LAYERS}
    finding = R.bf16_update_swamping(
        make_history(fmt="bfloat16", params=params), context("bfloat16")
    )
    assert finding.severity == "warning"


def test_bf16_update_swamping_fires_on_the_swamping_meter():
    finding = R.bf16_update_swamping(HEALTHY, context(lost_update_fraction=0.8))
    assert finding.severity == "warning" and "80%" in finding.evidence[-1].text


def test_bf16_update_swamping_is_info_while_compensation_recovers_the_updates():
    finding = R.bf16_update_swamping(
        HEALTHY, context(lost_update_fraction=0.8, compensation="kahan")
    )
    assert finding.severity == "info" and "Keep the kahan" in finding.fix


def test_bf16_update_swamping_uses_the_float16_epsilon_for_float16_weights():
    # eps(float16) / 2 = 2**-11 = 4.9e-4: a ratio of 1e-3 survives, 1e-4 does not.
    weights = {name: get_format("float16") for name in LAYERS}
    ctx = context("float16", weight_formats=weights)
    assert R.bf16_update_swamping(make_history(fmt="float16"), ctx) is None
    params = {name: {"update_ratio": 1e-4} for name in LAYERS}
    assert R.bf16_update_swamping(make_history(fmt="float16", params=params), ctx) is not None


def test_every_rule_returns_a_finding_with_json_ready_fields():
    history = make_history(
        fmt="float16",
        loss=lambda i: 1.0 + 0.3 * (-1) ** i,
        params=_underflowing(0.2, 0.3),
        modules={"2": {"absmax": 9000.0}, "1": {"dead_fraction": 0.9}},
    )
    for rule in R.RULES:
        finding = rule(history, context("float16"))
        if finding is not None:
            assert isinstance(finding, Finding)
            json.dumps(finding.to_dict(), allow_nan=False)


ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38]),
)


@settings(max_examples=40)
@given(
    losses=st.lists(ANY_FLOAT, min_size=1, max_size=60),
    norms=st.lists(ANY_FLOAT, min_size=60, max_size=60),
    ratios=st.lists(ANY_FLOAT, min_size=60, max_size=60),
    absmax=st.lists(ANY_FLOAT, min_size=60, max_size=60),
    skips=st.lists(st.booleans(), min_size=60, max_size=60),
    fmt=st.sampled_from(["float32", "bfloat16", "float16", "float8_e4m3fn"]),
)
def test_rules_accept_any_numbers_and_return_strict_json(losses, norms, ratios, absmax, skips, fmt):
    n = len(losses)
    history = make_history(
        steps=n,
        fmt=fmt,
        loss=lambda i: losses[i],
        grad_norm=lambda i: norms[i],
        skipped=lambda i: skips[i],
        loss_scale=lambda i: abs(norms[i]),
        params={name: {"update_ratio": lambda i: ratios[i]} for name in LAYERS},
        modules={
            "2": {"absmax": lambda i: abs(absmax[i])},
            "1": {"dead_fraction": lambda i: ratios[i]},
        },
    )
    for rule in R.RULES:
        finding = rule(history, context(fmt, min_loss_scale=1.0))
        if finding is not None:
            json.dumps(finding.to_dict(), allow_nan=False)
