"""``diagnose`` on small real training runs: the right top finding for each fault.

Each run is a model, a fault and a few dozen steps under a Monitor, on CPU with one
thread; the expected diagnosis is the fault that was planted.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finite import LossScaler
from finite.diagnosis import diagnose
from finite.monitor import Monitor

pytestmark = pytest.mark.usefixtures("one_thread")


def train(model, optimizer, batches, loss_fn, steps, *, log_dir=None, **monitor_kwargs):
    monitor_kwargs.setdefault("histograms_every", 0)
    with Monitor(model, optimizer, sync_every=50, log_dir=log_dir, **monitor_kwargs) as monitor:
        for i in range(steps):
            x, y = batches(i)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(loss.detach())
        findings = diagnose(monitor)
    return monitor, findings


def regression(batch, dim, target, dtype=torch.float32, fixed=False):
    w = torch.randn(dim, 1, generator=torch.Generator().manual_seed(123))

    def batches(i):
        x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0 if fixed else i))
        return x.to(dtype), target(x, w).to(dtype)

    return batches


def above_info(findings):
    return [f for f in findings if f.severity != "info"]


def test_healthy_300_step_run_has_nothing_above_info():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = regression(32, 8, lambda x, w: x @ w + 0.1 * torch.sin(3 * x[:, :1]))
    monitor, findings = train(model, optimizer, batches, F.mse_loss, 300, histograms_every=100)
    losses = monitor.history.steps["loss"]
    assert losses[-20:].mean() < 0.05 * losses[:5].mean()  # it did learn
    assert above_info(findings) == []


def test_float16_without_loss_scaling_is_diagnosed_as_gradient_underflow():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    with torch.no_grad():
        model[4].weight.mul_(1e-3)  # small outputs: small gradients everywhere
    model.half()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = regression(256, 16, lambda x, w: 1e-3 * torch.sin(x @ w), torch.float16)
    _, findings = train(
        model, optimizer, batches, lambda o, y: F.mse_loss(o.float(), y.float()), 40
    )
    top = findings[0]
    assert top.code == "fp16_gradient_underflow"
    assert "LossScaler(init_scale=" in top.fix


class RNNRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_rnn_without_clipping_is_diagnosed_as_exploding_gradients():
    torch.manual_seed(0)
    model = RNNRegressor()
    with torch.no_grad():
        # Recurrent weights slightly above the identity: the gradient through 40 steps
        # grows like 1.05**40 and the first updates push it over the edge.
        model.rnn.weight_hh_l0.copy_(1.05 * torch.eye(32))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def batches(i):
        x = torch.randn(16, 40, 4, generator=torch.Generator().manual_seed(i))
        return x, x[:, :5, 0].sum(1, keepdim=True)

    _, findings = train(model, optimizer, batches, F.mse_loss, 20)
    top = findings[0]
    assert top.code == "exploding_gradients" and top.severity == "critical"
    assert "clip_grad_norm_" in top.fix


def test_deep_sigmoid_mlp_is_diagnosed_as_vanishing_gradients():
    torch.manual_seed(0)
    layers, width = [], 16
    for _ in range(10):
        layers += [nn.Linear(width, 32), nn.Sigmoid()]
        width = 32
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = regression(64, 16, lambda x, w: torch.sin(x @ w))
    _, findings = train(model, optimizer, batches, F.mse_loss, 40, every=5)
    top = findings[0]
    assert top.code == "vanishing_gradients"
    assert top.evidence[0].module == "0.weight"
    # Sigmoid's derivative is at most 1/4: over ten layers the ratio is below 4**-10.
    assert top.evidence[0].value < 4.0**-10


def test_learning_rate_ten_times_too_high_is_diagnosed_as_oscillation_or_divergence():
    def run(lr):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        batches = regression(64, 8, lambda x, w: torch.sin(x @ w) + 3 * x[:, :1], fixed=True)
        return train(model, optimizer, batches, F.mse_loss, 100, every=5)[1]

    assert above_info(run(0.01)) == []
    findings = run(0.1)
    assert findings[0].code in ("loss_oscillation", "divergence_after_progress")
    assert "0.1 to 0.033-0.01" in findings[0].fix


def test_pure_bfloat16_adamw_at_a_small_learning_rate_is_diagnosed_as_swamping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = regression(64, 16, lambda x, w: torch.sin(x @ w), torch.bfloat16)
    _, findings = train(
        model, optimizer, batches, lambda o, y: F.mse_loss(o.float(), y.float()), 30, every=5
    )
    top = findings[0]
    assert top.code == "bf16_update_swamping" and top.severity == "warning"
    assert "compensated" in top.fix


class LogSoftmaxClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 10)

    def forward(self, x):
        return torch.log(torch.softmax(self.proj(x), dim=-1))  # the fault: log of a softmax


def test_log_of_softmax_in_float16_is_diagnosed_as_non_finite_loss_from_log_zero():
    torch.manual_seed(0)
    model = LogSoftmaxClassifier()
    with torch.no_grad():
        model.proj.weight.mul_(20)  # logits spread over more than ln(2**24): probabilities hit 0
    model.half()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def batches(i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(32, 16, generator=g).half(), torch.randint(0, 10, (32,), generator=g)

    _, findings = train(model, optimizer, batches, lambda o, y: F.nll_loss(o.float(), y), 5)
    top = findings[0]
    assert top.code == "nonfinite_loss" and top.severity == "critical"
    assert "log of 0" in top.title and top.first_step == 0
    assert "log_softmax" in top.fix


def test_diagnose_reads_the_history_jsonl_a_monitor_wrote(tmp_path):
    torch.manual_seed(0)
    model = LogSoftmaxClassifier()
    with torch.no_grad():
        model.proj.weight.mul_(20)
    model.half()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def batches(i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(32, 16, generator=g).half(), torch.randint(0, 10, (32,), generator=g)

    _, live = train(
        model, optimizer, batches, lambda o, y: F.nll_loss(o.float(), y), 5, log_dir=tmp_path
    )
    from_file = diagnose(tmp_path / "history.jsonl")
    from_dir = diagnose(tmp_path)
    assert [f.code for f in from_file] == [f.code for f in from_dir]
    assert from_file[0].code == live[0].code == "nonfinite_loss"
    assert from_file[0].title == live[0].title


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 50)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


class LSTMRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )

    def batches(i):
        g = torch.Generator().manual_seed(i)
        y = torch.randint(0, 4, (32,), generator=g)
        return torch.randn(32, 3, 8, 8, generator=g) + 0.5 * y[:, None, None, None], y

    return model, torch.optim.AdamW(model.parameters(), lr=3e-3), batches, F.cross_entropy


def _transformer():
    model = TinyTransformer()

    def batches(i):
        x = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(i))
        return x, x.roll(1, dims=1)

    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, 50), y.reshape(-1))

    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches, loss_fn


def _lstm():
    model = LSTMRegressor()

    def batches(i):
        x = torch.randn(16, 20, 4, generator=torch.Generator().manual_seed(i))
        return x, x[:, :3, 0].sum(1, keepdim=True)

    return model, torch.optim.Adam(model.parameters(), lr=3e-3), batches, F.mse_loss


@pytest.mark.parametrize("build", [_cnn, _transformer, _lstm], ids=["cnn", "transformer", "lstm"])
def test_healthy_small_models_have_nothing_above_info(build):
    torch.manual_seed(0)
    model, optimizer, batches, loss_fn = build()
    _, findings = train(model, optimizer, batches, loss_fn, 100, every=2)
    assert above_info(findings) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_healthy_autocast_runs_have_nothing_above_info(dtype):
    # float32 master weights under autocast: small updates are not swamped, and float16
    # gradients are scaled by a loss scaler.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = LossScaler(init_scale=2.0**16) if dtype == torch.float16 else None
    batches = regression(64, 16, lambda x, w: torch.sin(x @ w))
    with Monitor(model, optimizer, scaler=scaler, precision=dtype, sync_every=50) as monitor:
        for i in range(100):
            x, y = batches(i)
            with torch.autocast("cpu", dtype=dtype):
                loss = F.mse_loss(model(x).float(), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad()
            monitor.step(loss.detach())
        findings = diagnose(monitor)
    assert above_info(findings) == []
