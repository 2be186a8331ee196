"""``compare_precision``: one batch in float64/float32/bfloat16/float16, module by module."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finite.diagnosis.compare_precision import PrecisionReport, compare_precision
from finite.monitor import Monitor


class OneMinusSigmoid(nn.Module):
    """``1 - sigmoid(x + 8)``: sigmoid is within 2**-11 of 1, so the subtraction cancels
    every bit float16 and bfloat16 keep (the stable form is ``sigmoid(-(x + 8))``)."""

    def forward(self, x):
        return 1 - torch.sigmoid(x + 8)


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def sensitive_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.Tanh(),
        OneMinusSigmoid(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 1),
    )


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_precision_sensitive_module_is_named_first(dtype):
    report = compare_precision(sensitive_model(), batch(), F.mse_loss)
    assert report.ranking(dtype)[0].module == "2"
    assert report.ranking(dtype)[0].type == "OneMinusSigmoid"


def test_the_precision_sensitive_module_is_the_one_to_keep_in_float32():
    report = compare_precision(sensitive_model(), batch(), F.mse_loss)
    assert report.keep_in_float32 == ("2",)


def test_a_benign_model_has_nothing_to_keep_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1))
    report = compare_precision(model, batch(), F.mse_loss)
    assert report.keep_in_float32 == ()
    assert report.failed == () and not report.precision_problem


def test_module_error_is_the_relative_norm_error_against_a_float64_run():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x, y = batch()
    report = compare_precision(model, (x, y[:, :1].expand(32, 4)), F.mse_loss)
    # Independent reference: the same layer run by hand in float32 and float64.
    with torch.no_grad():
        out32 = F.linear(x, model.weight, model.bias).double()
        out64 = F.linear(x.double(), model.weight.double(), model.bias.double())
    expected = float(torch.linalg.vector_norm(out32 - out64) / torch.linalg.vector_norm(out64))
    (row,) = [m for m in report.modules if m.dtype == "float32" and m.module == ""]
    assert row.error == pytest.approx(expected, rel=1e-6)
    assert row.input_error == 0.0  # float32 holds these float32 inputs exactly


def test_gradient_error_is_measured_per_parameter():
    report = compare_precision(sensitive_model(), batch(), F.mse_loss)
    names = {g.param for g in report.gradients if g.dtype == "float16"}
    assert names == {f"{i}.{k}" for i in (0, 3, 5) for k in ("weight", "bias")}


def test_gradient_error_is_the_relative_norm_error_against_a_float64_run():
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    x, y = batch()
    report = compare_precision(model, (x, y), F.mse_loss, ("float16",))
    # Independent reference: autograd by hand on float16 and float64 copies.
    grads = {}
    for dtype in (torch.float16, torch.float64):
        w = model.weight.detach().to(dtype).requires_grad_()
        b = model.bias.detach().to(dtype).requires_grad_()
        F.mse_loss(F.linear(x.to(dtype), w, b), y.to(dtype)).backward()
        grads[dtype] = w.grad.double()
    diff = torch.linalg.vector_norm(grads[torch.float16] - grads[torch.float64])
    expected = float(diff / torch.linalg.vector_norm(grads[torch.float64]))
    (row,) = [g for g in report.gradients if g.dtype == "float16" and g.param == "weight"]
    assert row.error == pytest.approx(expected, rel=1e-6) and not row.nonfinite


def test_a_failure_only_in_float16_is_a_precision_problem():
    # exp(x) with x up to 12: 1.6e5 overflows float16's 65504, fits everywhere else.
    model = nn.Sequential(nn.Linear(1, 1), Exp())
    with torch.no_grad():
        model[0].weight.fill_(4.0)
        model[0].bias.fill_(0.0)
    x = torch.linspace(0, 3, 16).reshape(16, 1)
    report = compare_precision(model, x, lambda out: out.mean())
    assert report.failed == ("float16",)
    assert report.precision_problem and not report.reference_failed
    worst = report.ranking("float16")[0]
    assert (worst.module, worst.nonfinite, worst.added_error) == ("1", True, math.inf)
    assert "a precision problem" in str(report)


def test_a_failure_in_float64_too_is_not_a_precision_problem():
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    report = compare_precision(model, x, lambda out: torch.log(out - 1e3).mean())
    assert report.reference_failed and not report.precision_problem
    assert "not a precision problem" in str(report)


def test_the_model_is_left_unchanged():
    model = sensitive_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compare_precision(model, batch(), F.mse_loss)
    after = model.state_dict()
    assert all(
        after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items()
    )
    assert all(p.grad is None for p in model.parameters())


def test_a_monitored_model_can_be_compared_without_recording_steps():
    model = sensitive_model()
    with Monitor(model) as monitor:
        report = compare_precision(model, batch(), F.mse_loss)
        assert len(monitor.history.steps) == 0
    assert report.ranking("float16")[0].module == "2"


def test_integer_targets_stay_integers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    x = torch.randn(16, 8)
    labels = torch.randint(0, 5, (16,))
    report = compare_precision(model, (x, labels), F.cross_entropy)
    assert report.failed == ()


def test_batch_may_be_a_dict_or_a_tuple_of_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 1)

        def forward(self, x, z):
            return self.a(x) * z

    torch.manual_seed(0)
    model = Two()
    x, z = torch.randn(8, 4), torch.randn(8, 1)
    by_dict = compare_precision(model, {"x": x, "z": z}, lambda o: o.square().mean())
    by_tuple = compare_precision(model, ((x, z), None), lambda o, _: o.square().mean())
    assert by_dict.loss["float64"] == pytest.approx(by_tuple.loss["float64"])


def test_dtypes_accept_torch_dtypes_and_always_include_float64():
    report = compare_precision(
        nn.Linear(4, 1), torch.randn(8, 4), lambda o: o.mean(), [torch.float16]
    )
    assert report.dtypes == ("float64", "float16")


def test_report_to_dict_is_json():
    report = compare_precision(sensitive_model(), batch(), F.mse_loss)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["keep_in_float32"] == ["2"] and data["precision_problem"] is False
    assert isinstance(report, PrecisionReport)
    # The module table: bfloat16, float16, then float32, each worst first.
    assert [row["dtype"] for row in data["rows"][:1]] == ["bfloat16"]
    assert data["rows"][0]["module"] == "2"
    assert {row["dtype"] for row in data["rows"]} == {"float16", "bfloat16", "float32"}


def test_ranking_by_error_puts_downstream_modules_of_the_sensitive_one_high():
    report = compare_precision(sensitive_model(), batch(), F.mse_loss)
    by_error = [m.module for m in report.ranking("bfloat16", by="error")]
    assert by_error[0] == "2"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a model"}, TypeError, "model must be"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        ({"dtypes": "float16"}, TypeError, "dtypes must be a sequence"),
        ({"dtypes": ("float8_e4m3fn",)}, ValueError, "dtypes must be"),
        ({"dtypes": ("int8",)}, ValueError, "unknown format"),
        ({"batch": (torch.randn(2, 4), None, None)}, ValueError, "batch must be"),
        ({"loss_fn": lambda o: o}, TypeError, "one element"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    arguments = {"model": nn.Linear(4, 1), "batch": torch.randn(2, 4), "loss_fn": lambda o: o.sum()}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        compare_precision(**arguments)


def test_ranking_rejects_an_unknown_key():
    report = compare_precision(nn.Linear(4, 1), torch.randn(8, 4), lambda o: o.mean())
    with pytest.raises(ValueError, match="by must be"):
        report.ranking(by="loss")


def test_the_callers_random_state_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x = torch.randn(8, 4)
    torch.manual_seed(7)
    compare_precision(model, x, lambda o: o.sum())
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)


@pytest.mark.cuda
def test_a_cuda_model_is_compared_on_its_device():
    model = sensitive_model().cuda()
    x, y = batch()
    report = compare_precision(model, (x.cuda(), y.cuda()), F.mse_loss)
    assert report.ranking("float16")[0].module == "2"
    assert next(model.parameters()).device.type == "cuda"
