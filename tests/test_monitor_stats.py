"""Monitor statistics against direct computations on known tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from finite.formats import cast_report, get_format
from finite.monitor import HistogramBins, Monitor, log2_histogram
from finite.monitor.stats import UnderflowThresholds, count_totals, gradient_stats
from finite.scaling import LossScaler

FORMATS = ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float32"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Weighted(nn.Module):
    """``sum(w * x)``: the gradient of ``w`` is ``x``, whatever ``x`` is."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


def magnitudes_around(fmt_name: str) -> st.SearchStrategy[list[float]]:
    """Magnitudes across a format's range, with its rounding ties among them."""
    fmt = get_format(fmt_name)
    ties = [
        fmt.min_subnormal / 2,
        fmt.min_normal - fmt.min_subnormal / 2,
        fmt.min_subnormal,
        fmt.min_normal,
    ]
    edges = [float(np.nextafter(np.float32(t), np.float32(d))) for t in ties for d in (0, 1)]
    low, high = math.log2(fmt.min_subnormal) - 3, min(math.log2(fmt.max) + 2, 127.9)
    spread = st.floats(low, high).map(lambda e: float(np.float32(2.0**e)))
    value = st.one_of(st.sampled_from(ties + edges + [0.0]), spread)
    signed = st.tuples(value, st.booleans()).map(lambda v: -v[0] if v[1] else v[0])
    return st.lists(signed, min_size=1, max_size=40)


@pytest.mark.parametrize("fmt_name", FORMATS)
@given(data=st.data())
def test_underflow_and_subnormal_fractions_match_cast_report(fmt_name, data):
    values = data.draw(magnitudes_around(fmt_name))
    x = torch.tensor(values, dtype=torch.float32)
    fmt = get_format(fmt_name)
    _, counts = gradient_stats([x], {torch.float32: UnderflowThresholds(fmt, torch.float32)})
    zero, underflow, subnormal, normal, nonfinite = count_totals(
        counts.numpy(), np.array([x.numel()]), finite=np.array([False])
    )[0].tolist()
    finite_nonzero = underflow + subnormal + normal
    report = cast_report(x, fmt)
    assert zero == int((x == 0).sum())
    assert nonfinite == 0
    assert (underflow / finite_nonzero if finite_nonzero else 0.0) == report.underflow
    assert (subnormal / finite_nonzero if finite_nonzero else 0.0) == report.subnormal


def test_gradient_counts_put_inf_and_nan_apart_from_finite_values():
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.0, 0.0])
    fmt = get_format("float16")
    table, counts = gradient_stats([x], {torch.float32: UnderflowThresholds(fmt, torch.float32)})
    totals = count_totals(counts.numpy(), np.array([x.numel()]), finite=np.array([False]))
    assert totals[0].tolist() == [1, 0, 0, 1, 3]
    assert math.isnan(table[0, 1].item()) and math.isnan(table[0, 2].item())


def test_without_the_finite_count_a_gradient_with_nan_has_unknown_normal_and_non_finite():
    x = torch.tensor([math.nan, 1.0, 0.0, 1e-30])
    fmt = get_format("float16")
    thresholds = {torch.float32: UnderflowThresholds(fmt, torch.float32)}
    _, counts = gradient_stats([x], thresholds, count_finite=False)
    zero, underflow, subnormal, normal, nonfinite = count_totals(
        counts.numpy(), np.array([4]), finite=np.array([False])
    )[0].tolist()
    assert (zero, underflow, subnormal) == (1, 1, 0)
    assert math.isnan(normal) and math.isnan(nonfinite)


def test_non_finite_outputs_are_counted_from_the_sync_after_the_first_sighting():
    model = nn.Sequential(nn.Linear(3, 4))
    with torch.no_grad():
        model[0].bias[1] = math.nan  # one of 4 output features: 5 of 20 elements
    with Monitor(model, sync_every=1) as monitor:
        for _ in range(2):
            loss = model(torch.ones(5, 3)).square().sum()
            loss.backward()
            monitor.step(loss)
        counts = monitor.history.modules["nonfinite"].tolist()
        grad_counts = monitor.history.params.where(param="0.bias")["grad_nonfinite"].tolist()
    assert counts == [-1, 5]
    assert grad_counts == [-1, 1]  # d/db of sum(y**2) is 2 * sum(y): NaN for feature 1


def run_step(model, x, monitor, optimizer=None):
    loss = model(x)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    monitor.step(loss)
    return loss


def test_monitor_reports_underflow_of_each_gradient_like_cast_report():
    g = torch.tensor([1e-9, 3e-8, 1e-6, 1e-3, 1.0, 0.0, 2.0**-25, 7e4])
    model = Weighted(len(g))
    with Monitor(model, precision="float16") as monitor:
        run_step(model, g, monitor)
        params = monitor.history.params
    report = cast_report(g, "float16")
    assert params["grad_underflow_fraction"][0] == report.underflow
    assert params["grad_subnormal_fraction"][0] == report.subnormal


def test_gradient_norm_and_absmax_match_float64():
    g = torch.randn(50, generator=torch.Generator().manual_seed(3))
    model = Weighted(len(g))
    with Monitor(model, precision="bfloat16") as monitor:
        run_step(model, g, monitor)
        history = monitor.history
    expected = torch.linalg.vector_norm(g.double()).item()
    assert history.params["grad_norm"][0] == pytest.approx(expected, rel=1e-6)
    assert history.params["grad_absmax"][0] == g.abs().max().item()
    assert history.steps["grad_norm"][0] == pytest.approx(expected, rel=1e-6)
    assert history.params["grad_nonfinite"][0] == 0


def test_with_a_scaler_norms_are_unscaled_and_underflow_is_measured_on_scaled_gradients():
    g = torch.tensor([1e-9, 1e-8, 3e-7, 1e-3, 0.5])
    model = Weighted(len(g))
    scaler = LossScaler(init_scale=2.0**10)
    with Monitor(model, scaler=scaler, precision="float16") as monitor:
        loss = model(g)
        scaler.scale(loss).backward()
        monitor.step(loss)
        history = monitor.history
    scaled = g * 2.0**10
    assert history.steps["loss_scale"][0] == 2.0**10
    assert history.params["grad_norm"][0] == pytest.approx(
        torch.linalg.vector_norm(g.double()).item(), rel=1e-6
    )
    assert history.params["grad_underflow_fraction"][0] == cast_report(scaled, "float16").underflow
    assert history.params["grad_subnormal_fraction"][0] == cast_report(scaled, "float16").subnormal


def test_update_ratio_is_update_norm_over_weight_norm_before_the_step():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 5)
    with Monitor(model, optimizer) as monitor:
        for _ in range(2):  # the second step has momentum: the update is not lr * grad
            before = model.weight.detach().double().clone()
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(loss)
        rows = monitor.history.params.where(param="weight", step=1)
    after = model.weight.detach().double()
    update = torch.linalg.vector_norm(after - before).item()
    assert rows["update_norm"][0] == pytest.approx(update, rel=1e-5)
    assert rows["update_ratio"][0] == pytest.approx(
        update / torch.linalg.vector_norm(before).item(), rel=1e-5
    )
    assert rows["weight_norm"][0] == pytest.approx(
        torch.linalg.vector_norm(before).item(), rel=1e-6
    )


def test_update_ratio_is_nan_for_a_weight_that_was_zero():
    model = Weighted(3)
    with torch.no_grad():
        model.w.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer) as monitor:
        run_step(model, torch.ones(3), monitor, optimizer)
        ratio = monitor.history.params["update_ratio"][0]
    assert math.isnan(ratio)


def test_activation_absmax_rms_and_headroom_match_float64():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(10, 6) * 30
    with Monitor(model, precision="float16") as monitor:
        loss = model(x).sum()
        loss.backward()
        monitor.step(loss)
        row = monitor.history.modules.where(module="0")
    y = torch.nn.functional.linear(x.double(), model[0].weight.double(), model[0].bias.double())
    absmax = y.abs().max().item()
    assert row["absmax"][0] == pytest.approx(absmax, rel=1e-5)
    assert row["rms"][0] == pytest.approx(y.square().mean().sqrt().item(), rel=1e-5)
    assert row["headroom_bits"][0] == pytest.approx(math.log2(65504.0 / absmax), rel=1e-5)
    assert row["numel"][0] == 40 and row["calls"][0] == 1 and row["nonfinite"][0] == 0


def test_dead_units_are_relu_features_zero_for_the_whole_batch():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with torch.no_grad():
        model[0].weight[[0, 3]] = 0.0
        model[0].bias[[0, 3]] = -1.0  # units 0 and 3 are always negative: dead
    x = torch.randn(32, 4)
    with Monitor(model) as monitor:
        loss = model(x).sum()
        loss.backward()
        monitor.step(loss)
        row = monitor.history.modules.where(module="1")
    out = torch.relu(model[0](x)).detach()
    expected = (out == 0).all(dim=0).double().mean().item()
    assert expected >= 2 / 6
    assert row["dead_fraction"][0] == expected


def test_dead_units_of_images_are_channels():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = -0.5
    x = torch.randn(3, 2, 6, 6)
    with Monitor(model) as monitor:
        loss = model(x).sum()
        loss.backward()
        monitor.step(loss)
        row = monitor.history.modules.where(module="1")
    out = torch.relu(model[0](x)).detach()
    expected = (out == 0).all(dim=3).all(dim=2).all(dim=0).double().mean().item()
    assert row["dead_fraction"][0] == expected


@pytest.mark.parametrize(
    ("module", "derivative", "maximum"),
    [
        (nn.Sigmoid(), lambda y: y * (1 - y), 0.25),
        (nn.Tanh(), lambda y: 1 - y * y, 1.0),
    ],
)
def test_saturated_fraction_counts_outputs_with_derivative_below_one_percent(
    module, derivative, maximum
):
    x = torch.linspace(-12, 12, 2001).reshape(1, -1).requires_grad_()
    model = nn.Sequential(module)
    with Monitor(model) as monitor:
        loss = model(x).sum()
        loss.backward()
        monitor.step(loss)
        row = monitor.history.modules.where(module="0")
    y = module(x).detach().double()
    expected = (derivative(y) < 0.01 * maximum).double().mean().item()
    assert 0.1 < expected < 0.9
    assert row["saturated_fraction"][0] == pytest.approx(expected, abs=1e-12)


def test_saturation_and_dead_units_do_not_apply_to_other_modules():
    model = nn.Sequential(nn.Linear(3, 3))
    with Monitor(model) as monitor:
        loss = model(torch.randn(4, 3)).sum()
        loss.backward()
        monitor.step(loss)
        row = monitor.history.modules.where(module="0")
    assert math.isnan(row["dead_fraction"][0]) and math.isnan(row["saturated_fraction"][0])


def _reference_bin(value: float, bins: HistogramBins) -> int:
    if value == 0:
        return 0
    if not math.isfinite(value):
        return bins.nbins - 1
    _, exponent = math.frexp(abs(value))  # |v| = m * 2**e, m in [0.5, 1)
    k = exponent - 1
    if k < bins.low:
        return 1
    if k >= bins.high:
        return bins.nbins - 2
    return 2 + k - bins.low


@pytest.mark.parametrize("fmt_name", ["float16", "bfloat16", "float8_e4m3fn"])
@given(data=st.data())
def test_log2_histogram_bins_each_value_by_its_exponent(fmt_name, data):
    bins = HistogramBins.for_format(get_format(fmt_name))
    exponents = st.integers(bins.low - 4, min(bins.high + 4, 127))
    powers = exponents.map(lambda e: float(np.float32(2.0**e)))
    values = data.draw(
        st.lists(
            st.one_of(
                powers,
                st.floats(width=32, allow_nan=True, allow_infinity=True),
                st.sampled_from([0.0, -0.0]),
            ),
            min_size=1,
            max_size=50,
        )
    )
    x = torch.tensor(values, dtype=torch.float32)
    expected = np.zeros(bins.nbins, dtype=np.int64)
    for v in x.tolist():
        expected[_reference_bin(v, bins)] += 1
    assert log2_histogram(x, bins).tolist() == expected.tolist()


def test_histogram_bins_cover_the_format_with_margin():
    fmt = get_format("float16")
    bins = HistogramBins.for_format(fmt)
    assert bins.low == -24 - 8 and bins.high == 16 + 8
    assert bins.bands["subnormal"] == (-25.0, -14.0)
    assert bins.bands["normal"] == (-14.0, math.log2(65504.0))


def test_histograms_every_n_steps_for_weights_and_gradients():
    model = Weighted(4)
    with Monitor(model, precision="float16", histograms_every=2) as monitor:
        for _ in range(3):
            run_step(model, torch.tensor([0.0, 1e-9, 1.0, 3.0]), monitor)
        table = monitor.history.histograms
    assert table["step"].tolist() == [0, 0, 2, 2]
    assert table["tensor"].tolist() == ["weight", "grad"] * 2
    bins = monitor.history.bins
    grad = table.where(step=0, tensor="grad")["counts"][0]
    expected = np.zeros(bins.nbins, dtype=np.int64)
    for v in (0.0, float(np.float32(1e-9)), 1.0, 3.0):
        expected[_reference_bin(v, bins)] += 1
    assert grad.tolist() == expected.tolist()


def test_precision_defaults_to_the_narrowest_parameter_dtype():
    model = nn.Sequential(nn.Linear(2, 2).to(torch.bfloat16))
    with Monitor(model) as monitor:
        model(torch.ones(1, 2, dtype=torch.bfloat16)).float().sum().backward()
        assert monitor.format.name == "bfloat16"


def test_precision_defaults_to_the_autocast_dtype():
    model = nn.Sequential(nn.Linear(2, 2))
    with Monitor(model) as monitor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.ones(1, 2))
        out.float().sum().backward()
        assert monitor.format.name == "bfloat16"
