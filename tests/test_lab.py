"""The lab: each planted fault shows its symptom, its fix removes it, the doctor names it.

The symptoms are checked on the runs' own records (loss, gradient norms, weights)
against the arithmetic of the fault (exp overflow above 88.7, a sigmoid's slope at most
1/4, ...), independently of the diagnosis; the diagnosis is then checked against the
code planted in each scenario.
"""

import copy
import json
import math

import mpmath
import numpy as np
import pytest
import torch

from finite import MasterWeights, cli, ops
from finite.cli import lab_command
from finite.lab import (
    SCENARIOS,
    attention_overflow,
    bf16_swamping,
    cancellation,
    exploding_rnn,
    fp16_gradient_accumulation,
    get_scenario,
    lr_too_high,
    run_scenario,
    vanishing_sigmoid,
    zero_variance_norm,
)
from finite.lab._training import regression_batches

#: Scenarios that take more than a few seconds (the whole lab in the suite stays within a
#: minute on two cores).
SLOW = {"fp16-underflow"}
FLOAT16_MAX = torch.finfo(torch.float16).max


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def lab_registered(monkeypatch):
    # `finite lab` as the command line wires it, whether or not it is registered yet.
    if lab_command not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, lab_command))


def losses(monitor):
    return np.asarray(monitor.history.steps["loss"], dtype=float)


def first_layer_grad_ratio(monitor, first, last):
    """Mean over measured steps of |grad first| / |grad last| (params table)."""
    params = monitor.history.params
    names = np.asarray(params["param"])
    norms = np.asarray(params["grad_norm"], dtype=float)
    return float(np.mean(norms[names == first]) / np.mean(norms[names == last]))


def changed_fraction(trained, initial):
    return float((trained != initial).float().mean())


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in SCENARIOS],
)
def test_doctor_names_the_planted_fault_first_and_passes_the_fix(name):
    result = run_scenario(SCENARIOS[name])
    assert result.broken.findings[0] == SCENARIOS[name].expected
    assert result.fixed.worst_severity in (None, "info")
    assert result.match


def test_naive_softmax_on_large_logits_gives_nan_loss_and_the_stable_one_does_not():
    scenario = SCENARIOS["softmax-overflow"]
    assert math.isnan(losses(scenario.train(False))[0])
    fixed = losses(scenario.train(True))
    assert np.isfinite(fixed).all()
    assert fixed[-1] < fixed[0]


def test_log_of_float16_softmax_gives_infinite_loss_and_cross_entropy_from_logits_does_not():
    scenario = SCENARIOS["log-of-probabilities"]
    assert losses(scenario.train(False))[0] == math.inf
    assert np.isfinite(losses(scenario.train(True))).all()


def test_cross_entropy_from_logits_learns_away_the_planted_logit_scale():
    fixed = losses(SCENARIOS["log-of-probabilities"].train(True))
    assert fixed[-1] < fixed[0] / 5


def small_gradient_share(monitor):
    """Median over measured steps of the share of non-zero gradient elements that flush to
    zero or are subnormal in float16, as stored (scaled), from the monitor's statistics."""
    params = monitor.history.params
    share = np.asarray(params["grad_underflow_fraction"], dtype=float) + np.asarray(
        params["grad_subnormal_fraction"], dtype=float
    )
    numel = np.asarray(params["numel"], dtype=float)
    steps = np.asarray(params["step"])
    per_step = [
        np.average(share[steps == s], weights=numel[steps == s])
        for s in np.unique(steps)
        if np.isfinite(share[steps == s]).all()
    ]
    return float(np.median(per_step))


@pytest.mark.slow
def test_float16_gradients_flush_or_turn_subnormal_unscaled_and_not_under_the_loss_scale():
    scenario = SCENARIOS["fp16-underflow"]
    # Below float16's smallest normal number, 2**-14, a value keeps fewer than 11
    # significant bits, and below 2**-24 it is zero.
    assert small_gradient_share(scenario.train(False)) > 0.1
    assert small_gradient_share(scenario.train(True)) < 0.01


def test_rnn_gradient_norm_explodes_to_non_finite_without_clipping_and_not_with_it():
    scenario = SCENARIOS["exploding-rnn"]
    broken = np.asarray(scenario.train(False).history.steps["grad_norm"], dtype=float)
    fixed = np.asarray(scenario.train(True).history.steps["grad_norm"], dtype=float)
    # With recurrent weights at the identity the first gradient is in the hundreds; one
    # unclipped step makes the next orders of magnitude larger, then it overflows.
    first_bad = int(np.argmax(~np.isfinite(broken)))
    assert not np.isfinite(broken).all() and first_bad <= 10
    assert np.nanmax(broken[:first_bad]) > 1e6 * broken[0]
    assert np.isfinite(fixed).all() and fixed.max() < 10 * fixed[0]


def test_clipped_rnn_learns_and_the_unclipped_one_ends_in_nan():
    scenario = SCENARIOS["exploding-rnn"]
    broken, fixed = losses(scenario.train(False)), losses(scenario.train(True))
    assert math.isnan(broken[-1])
    assert fixed[-1] < fixed[0] / 4


def recurrent_matrix_after_one_step(max_norm):
    """W_hh after one SGD step from the scenario's start, in float64 (clipped or not)."""
    model = exploding_rnn.build_model().double()
    x, y = exploding_rnn.batches(0)
    torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # PyTorch's own
    weight = model.rnn.weight_hh_l0
    return (weight - exploding_rnn.LEARNING_RATE * weight.grad).detach()


def largest_singular_value(matrix):
    return torch.linalg.matrix_norm(matrix, 2).item()


def test_one_unclipped_step_stretches_the_recurrent_matrix_and_a_clipped_one_cannot():
    # From the identity (largest singular value 1): a clipped step changes W_hh by at most
    # lr * max_norm in norm, so its largest singular value stays within 1 + 0.005.
    assert largest_singular_value(recurrent_matrix_after_one_step(None)) > 1.4
    bound = 1 + exploding_rnn.LEARNING_RATE * exploding_rnn.MAX_NORM
    clipped = recurrent_matrix_after_one_step(exploding_rnn.MAX_NORM)
    assert largest_singular_value(clipped) <= bound


def test_sigmoid_stack_starves_the_first_layer_and_gelu_with_he_init_does_not():
    ratio_broken = first_layer_grad_ratio(vanishing_sigmoid.train(False), "0.weight", "20.weight")
    ratio_fixed = first_layer_grad_ratio(vanishing_sigmoid.train(True), "0.weight", "20.weight")
    assert ratio_broken < 4.0**-10  # the sigmoid's slope is at most 1/4 per layer
    assert ratio_fixed > 1e-2


def test_gelu_stack_ends_with_a_lower_loss_than_the_sigmoid_stack():
    scenario = SCENARIOS["vanishing-sigmoid"]
    assert losses(scenario.train(True))[-1] < losses(scenario.train(False))[-1]


def largest_curvature(model, x, y, iterations=40):
    """Largest eigenvalue of the loss Hessian, by power iteration on float64 products."""
    names = [name for name, _ in model.named_parameters()]
    reference = copy.deepcopy(model).double()
    weights = tuple(p.detach().double() for p in model.parameters())

    def loss(*flat):
        named = dict(zip(names, flat, strict=True))
        out = torch.func.functional_call(reference, named, (x.double(),))
        return torch.nn.functional.mse_loss(out, y.double())

    vector = tuple(torch.randn_like(w) for w in weights)
    value = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum((v * v).sum() for v in vector))
        vector = tuple(v / norm for v in vector)
        _, product = torch.autograd.functional.hvp(loss, weights, vector)
        value = float(sum((v * p).sum() for v, p in zip(vector, product, strict=True)))
        vector = product
    return value


def test_sgd_at_the_too_high_rate_starts_stable_and_sharpens_past_two_over_lr():
    torch.manual_seed(1)  # the power iteration's start vector
    model = lr_too_high.build_model()
    x, y = lr_too_high.batch()
    limit = 2 / lr_too_high.BROKEN_LR
    assert largest_curvature(model, x, y) < limit  # the first steps are stable
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_too_high.BROKEN_LR)
    for _ in range(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert largest_curvature(model, x, y) > 2 * limit


def test_too_high_learning_rate_makes_progress_swings_then_overflows():
    loss = losses(SCENARIOS["lr-too-high"].train(False))
    finite_part = loss[np.isfinite(loss)]
    low = int(np.argmin(finite_part[:10]))
    assert finite_part[low] < loss[0] / 3  # progress first
    assert np.max(finite_part[low : low + 10]) > 2 * finite_part[low]  # then it swings
    assert not np.isfinite(loss[-1])  # and ends non-finite


def test_warmed_up_lower_learning_rate_brings_the_full_batch_loss_down_twentyfold():
    fixed = losses(SCENARIOS["lr-too-high"].train(True))
    assert np.all(np.isfinite(fixed))
    assert fixed[-1] < fixed[0] / 20


def test_pure_bfloat16_rounds_small_updates_away_and_kahan_compensation_keeps_them():
    torch.manual_seed(0)  # the scenario's seed: the first module built is the first layer
    initial = torch.nn.Linear(16, 64).to(torch.bfloat16).weight.detach()
    broken = bf16_swamping.train(False).model[0].weight.detach()
    fixed = bf16_swamping.train(True).model[0].weight.detach()
    assert changed_fraction(fixed, initial) > 2 * changed_fraction(broken, initial)


def float32_reference_losses():
    """The bf16-swamping run with float32 weights and plain AdamW, written here in PyTorch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    ).to(torch.bfloat16)
    model.float()  # the same bfloat16-rounded initial weights, trained in float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=bf16_swamping.LR)
    batches = regression_batches(64, 16, lambda x, w: torch.sin(x @ w))
    out = []
    for i in range(bf16_swamping.STEPS):
        x, y = batches(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return np.asarray(out)


def test_kahan_bfloat16_follows_float32_and_plain_bfloat16_stalls_above_it():
    reference = float32_reference_losses()[-20:].mean()
    broken = losses(bf16_swamping.train(False))[-20:].mean()
    fixed = losses(bf16_swamping.train(True))[-20:].mean()
    assert fixed == pytest.approx(reference, rel=0.01)
    assert broken > 1.1 * reference


def test_unscaled_attention_scores_pass_float16_max_and_scaled_ones_stay_below_it():
    torch.manual_seed(0)  # the scenario's seed: its model's initial weights
    model = attention_overflow.SelfAttention(fixed=False)
    x, _ = attention_overflow.batches(0)
    q, k, _ = model.qkv(x).detach().double().chunk(3, dim=-1)
    scores = (q @ k.transpose(-2, -1)).abs().max().item()  # float64: the exact scores
    fp16_max = torch.finfo(torch.float16).max
    assert scores > fp16_max
    assert scores / math.sqrt(attention_overflow.DIM) < fp16_max


def test_unscaled_float16_attention_gives_nan_loss_and_finite_memory_attention_does_not():
    scenario = SCENARIOS["attention-overflow"]
    assert math.isnan(losses(scenario.train(False))[0])
    assert np.isfinite(losses(scenario.train(True))).all()


def test_constant_feature_has_exactly_zero_variance():
    x, _ = zero_variance_norm.batches(0)
    assert np.var(x[:, 0].numpy().astype(np.float64)) == 0.0


def test_standardising_without_epsilon_gives_nan_loss_and_with_epsilon_does_not():
    scenario = SCENARIOS["zero-variance-norm"]
    assert math.isnan(losses(scenario.train(False))[0])
    assert np.isfinite(losses(scenario.train(True))).all()


def first_logits():
    """The scenario's float32 logits on its first batch, and the labels."""
    x, y = cancellation.batches(0)
    with torch.no_grad():
        return cancellation.build_model()(x).squeeze(-1), y


def exact_log_likelihood(z, y):
    """log prod(p or 1 - p) at 50 digits, p = sigmoid(z) from the float32 logits."""
    with mpmath.workdps(50):
        total = mpmath.mpf(0)
        for zt, yt in zip(z.double().tolist(), y.tolist(), strict=True):
            p = 1 / (1 + mpmath.exp(-mpmath.mpf(zt)))
            total += mpmath.log(p if yt else 1 - p)
        return float(total)


def test_float32_one_minus_sigmoid_cancels_to_zero_where_the_exact_log_is_finite():
    # 1 - 2**-24 is the largest float32 below 1: sigmoid(z) rounds to 1 past z ~ 16.6.
    assert torch.sigmoid(torch.tensor(17.0)).item() == 1.0
    z, y = first_logits()
    cancelled = (~y.bool()) & (1 - torch.sigmoid(z) == 0)
    assert cancelled.any()
    zt = z[cancelled][0]
    with mpmath.workdps(50):
        exact = float(mpmath.log(1 - 1 / (1 + mpmath.exp(-mpmath.mpf(zt.item())))))
    assert -math.inf < exact < -16
    assert ops.log_sigmoid(-zt).item() == pytest.approx(exact, rel=1e-6)


def test_likelihood_product_underflows_in_float32_where_the_exact_log_likelihood_is_finite():
    z, y = first_logits()
    p = torch.sigmoid(z)
    factors = torch.where(y.bool(), p, 1 - p)
    # A sequence none of whose float32 factors is 0, whose product still is.
    candidates = ((factors > 0).all(dim=1) & (factors.prod(dim=1) == 0)).nonzero()
    assert len(candidates) > 0
    i = int(candidates[0])
    exact = exact_log_likelihood(z[i], y[i])
    smallest_float32 = math.log(2.0**-149)  # -103.3
    assert -math.inf < exact < smallest_float32
    stable = cancellation.stable_nll(z[i : i + 1], y[i : i + 1]).item()
    assert stable == pytest.approx(-exact, rel=1e-5)


def test_likelihood_product_gives_nonfinite_loss_and_the_log_space_sum_learns():
    scenario = SCENARIOS["cancellation"]
    assert not math.isfinite(losses(scenario.train(False))[0])
    fixed = losses(scenario.train(True))
    assert np.isfinite(fixed).all()
    assert fixed[-1] < fixed[0] / 10


def test_sqrt_derivative_at_zero_times_zero_is_nan():
    zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
    torch.sqrt(zero * zero).backward()  # d sqrt(u)/du = inf at u = 0, du/dx = 0
    assert math.isnan(zero.grad.item())


def test_distance_via_sqrt_gives_nan_gradients_from_a_finite_loss_and_safe_sqrt_does_not():
    scenario = SCENARIOS["sqrt-at-zero"]
    broken = scenario.train(False).history.steps
    fixed = scenario.train(True).history.steps
    assert math.isfinite(float(broken["loss"][0]))
    assert int(broken["nonfinite_grads"][0]) > 0
    assert not any(int(n) for n in fixed["nonfinite_grads"])
    assert np.isfinite(np.asarray(fixed["loss"], dtype=float)).all()


def micro_batch_gradients():
    """Each micro-batch's float16 gradients of the first window, at the initial weights."""
    model = fp16_gradient_accumulation.build_model()
    grads = []
    for micro in range(fp16_gradient_accumulation.MICRO_BATCHES):
        model.zero_grad(set_to_none=True)
        x, y = fp16_gradient_accumulation.micro_batch(0, micro)
        fp16_gradient_accumulation.summed_loss(model, x, y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def accumulated_gradients(master_weights):
    """The first window's gradients as the scenario accumulates them: in the float16 .grad,
    or in float32 MasterWeights."""
    model = fp16_gradient_accumulation.build_model()
    master = MasterWeights(model.parameters()) if master_weights else None
    for micro in range(fp16_gradient_accumulation.MICRO_BATCHES):
        x, y = fp16_gradient_accumulation.micro_batch(0, micro)
        fp16_gradient_accumulation.summed_loss(model, x, y).backward()
        if master is not None:
            master.accumulate_grads_()
    params = master.parameters() if master is not None else model.parameters()
    return [p.grad for p in params]


def test_each_micro_batch_gradient_fits_in_float16_and_their_exact_sum_does_not():
    grads = micro_batch_gradients()
    assert all(torch.isfinite(g).all() for micro in grads for g in micro)
    assert max(g.abs().max().item() for micro in grads for g in micro) < FLOAT16_MAX
    exact = [sum(micro[k].double() for micro in grads) for k in range(len(grads[0]))]
    assert max(g.abs().max().item() for g in exact) > FLOAT16_MAX


def relative_errors(accumulated, exact):
    """Per element |accumulated - exact| / max(|exact|, 1), flattened."""
    return torch.cat(
        [
            ((a.double() - e).abs() / e.abs().clamp_min(1.0)).flatten()
            for a, e in zip(accumulated, exact, strict=True)
        ]
    )


def test_float16_accumulation_overflows_and_float32_master_gradients_match_the_exact_sum():
    grads = micro_batch_gradients()
    exact = [sum(micro[k].double() for micro in grads) for k in range(len(grads[0]))]
    in_float16 = accumulated_gradients(master_weights=False)
    in_float32 = accumulated_gradients(master_weights=True)
    assert any(torch.isinf(g).any() for g in in_float16)
    assert all(g.dtype == torch.float32 for g in in_float32)
    # 32 float16 terms summed in float32: at most 31 roundings of 2**-24 each.
    float32_error = relative_errors(in_float32, exact).max().item()
    assert float32_error < 32 * 2.0**-24
    # Where the float16 sum stayed finite it is still rounded to 11 bits at every step.
    float16_errors = relative_errors(in_float16, exact)
    assert float16_errors[float16_errors.isfinite()].max().item() > 100 * float32_error


def test_float16_accumulation_run_turns_non_finite_and_the_float32_one_learns():
    scenario = SCENARIOS["fp16-gradient-accumulation"]
    broken = scenario.train(False).history.steps
    fixed = losses(scenario.train(True))
    assert int(broken["nonfinite_grads"][0]) > 0 and math.isfinite(float(broken["loss"][0]))
    assert not np.isfinite(np.asarray(broken["loss"], dtype=float)[1:]).any()
    assert np.isfinite(fixed).all() and fixed[-1] < fixed[0] / 10


def test_runs_are_deterministic():
    # NaN != NaN: compare the JSON text of the records.
    first = json.dumps(run_scenario(SCENARIOS["exploding-rnn"]).record())
    second = json.dumps(run_scenario(SCENARIOS["exploding-rnn"]).record())
    assert first == second


def test_the_lab_has_the_twelve_scenarios_of_the_issue_in_order():
    assert list(SCENARIOS) == [
        "softmax-overflow",
        "log-of-probabilities",
        "fp16-underflow",
        "exploding-rnn",
        "vanishing-sigmoid",
        "lr-too-high",
        "bf16-swamping",
        "attention-overflow",
        "zero-variance-norm",
        "cancellation",
        "sqrt-at-zero",
        "fp16-gradient-accumulation",
    ]


def test_get_scenario_rejects_an_unknown_name_naming_it():
    with pytest.raises(ValueError, match="'no-such-fault'"):
        get_scenario("no-such-fault")


def test_cli_lists_every_scenario_as_json(capsys):
    assert cli.main(["lab", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listed] == list(SCENARIOS)


def test_cli_json_run_of_one_scenario_reports_the_match_and_writes_reports(capsys, tmp_path):
    assert cli.main(["lab", "softmax-overflow", "--json", "--out", str(tmp_path)]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["name"] == "softmax-overflow"
    assert record["broken"]["first_nonfinite_step"] == 0
    assert record["fixed"]["first_nonfinite_step"] is None
    assert record["found"][0] == record["expected"] == "nonfinite_loss"
    assert record["match"] is True
    assert (tmp_path / "softmax-overflow" / "broken" / "report.html").exists()
    assert 'href="softmax-overflow/fixed/report.html"' in (tmp_path / "index.html").read_text()


def test_cli_unknown_scenario_exits_2(capsys):
    assert cli.main(["lab", "no-such-fault"]) == 2
    assert "no-such-fault" in capsys.readouterr().err
