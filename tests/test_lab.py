"""The lab: each planted fault shows its symptom, its fix removes it, the doctor names it.

The symptoms are checked on the runs' own records (loss, gradient norms, weights)
against the arithmetic of the fault (exp overflow above 88.7, a sigmoid's slope at most
1/4, ...), independently of the diagnosis; the diagnosis is then checked against the
code planted in each scenario.
"""

import json
import math

import numpy as np
import pytest
import torch

from finite import cli
from finite.cli import lab_command
from finite.lab import (
    SCENARIOS,
    attention_overflow,
    bf16_swamping,
    cancellation,
    fp16_underflow,
    get_scenario,
    run_scenario,
    vanishing_sigmoid,
    zero_variance_norm,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_doctor_names_the_planted_fault_first_and_passes_the_fix(name):
    result = run_scenario(SCENARIOS[name])
    assert result.broken.findings[0] == SCENARIOS[name].expected
    assert result.fixed.worst_severity in (None, "info")
    assert result.match


def test_naive_softmax_on_large_logits_gives_nan_loss_and_the_stable_one_does_not():
    scenario = SCENARIOS["softmax-overflow"]
    assert math.isnan(losses(scenario.train(False))[0])
    assert np.isfinite(losses(scenario.train(True))).all()


def test_log_of_float16_softmax_gives_infinite_loss_and_cross_entropy_from_logits_does_not():
    scenario = SCENARIOS["log-of-probabilities"]
    assert losses(scenario.train(False))[0] == math.inf
    assert np.isfinite(losses(scenario.train(True))).all()


def test_float16_hidden_gradients_are_subnormal_unscaled_and_normal_at_a_scale_of_2_to_16():
    def subnormal_or_zero_fraction(scale):
        model = fp16_underflow.build_model()
        x, y = fp16_underflow.batches(0)
        loss = torch.nn.functional.mse_loss(model(x.half()).float(), y)
        (loss * scale).backward()
        grads = torch.cat([model[0].weight.grad.flatten(), model[2].weight.grad.flatten()])
        # Below float16's smallest normal number, 2**-14, a value keeps fewer than 10
        # significant bits, and below 2**-24 it is zero.
        return float((grads.abs() < torch.finfo(torch.float16).tiny).float().mean())

    assert subnormal_or_zero_fraction(1.0) > 0.9
    assert subnormal_or_zero_fraction(2.0**16) < 0.01


def test_rnn_gradient_norm_explodes_without_clipping_and_stays_bounded_with_it():
    scenario = SCENARIOS["exploding-rnn"]
    broken = np.asarray(scenario.train(False).history.steps["grad_norm"], dtype=float)
    fixed = np.asarray(scenario.train(True).history.steps["grad_norm"], dtype=float)
    # 1.05**40 = 7.0: the recurrent Jacobian alone gives a few thousand at step 0; the
    # unclipped updates push the weights further and the norm grows by orders of magnitude.
    assert broken.max() > 100 * broken[0]
    assert fixed.max() < 10 * fixed[0]


def test_sigmoid_stack_starves_the_first_layer_and_gelu_with_he_init_does_not():
    ratio_broken = first_layer_grad_ratio(vanishing_sigmoid.train(False), "0.weight", "20.weight")
    ratio_fixed = first_layer_grad_ratio(vanishing_sigmoid.train(True), "0.weight", "20.weight")
    assert ratio_broken < 4.0**-10  # the sigmoid's slope is at most 1/4 per layer
    assert ratio_fixed > 1e-2


def test_too_high_learning_rate_makes_full_batch_loss_rise_and_warmed_up_lower_one_does_not():
    scenario = SCENARIOS["lr-too-high"]
    # On one fixed batch, gradient descent below the stability limit lowers the loss at
    # every step; above it, steps overshoot and the loss goes up again and again.
    rising_broken = float(np.mean(np.diff(losses(scenario.train(False))) > 0))
    rising_fixed = float(np.mean(np.diff(losses(scenario.train(True))) > 0))
    assert rising_broken > 0.2
    assert rising_fixed < 0.05


def test_pure_bfloat16_rounds_small_updates_away_and_kahan_compensation_keeps_them():
    torch.manual_seed(0)  # the scenario's seed: the first module built is the first layer
    initial = torch.nn.Linear(16, 64).to(torch.bfloat16).weight.detach()
    broken = bf16_swamping.train(False).model[0].weight.detach()
    fixed = bf16_swamping.train(True).model[0].weight.detach()
    assert changed_fraction(fixed, initial) > 2 * changed_fraction(broken, initial)


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


def test_float32_sigmoid_rounds_to_one_where_the_first_batch_has_confident_logits():
    # 1 - 2**-24 is the largest float32 below 1; sigmoid(z) rounds to it or to 1 past z ~ 16.6.
    assert torch.sigmoid(torch.tensor(17.0)).item() == 1.0
    torch.manual_seed(0)  # the scenario's seed: its model's initial weights
    model = torch.nn.Linear(16, 1)
    x, _ = cancellation.batches(0)
    logits = 50.0 * x.double() @ model.weight.detach().double().T + model.bias.item()
    assert (logits > 17).any()


def test_log_one_minus_sigmoid_gives_nonfinite_loss_and_log_space_does_not():
    scenario = SCENARIOS["cancellation"]
    assert not math.isfinite(losses(scenario.train(False))[0])
    assert np.isfinite(losses(scenario.train(True))).all()


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


def test_runs_are_deterministic():
    first = run_scenario(SCENARIOS["exploding-rnn"]).record()
    second = run_scenario(SCENARIOS["exploding-rnn"]).record()
    assert first == second


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
