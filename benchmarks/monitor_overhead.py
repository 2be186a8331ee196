"""Step time of a small transformer with and without finite.Monitor, side by side.

A 6-layer transformer encoder (d_model 256, 4 heads, feed-forward 1024, sequence 128,
batch 16) trains with AdamW under four set-ups, each on its own copy of the same model:

* ``none``: plain training step;
* ``monitor``: ``Monitor(every=1, sync_every=10, histograms_every=0)``;
* ``monitor+hist``: the default ``Monitor`` (histograms every 100 steps): its per-step
  time is the ``monitor`` time plus 1/100 of the extra time of a histogram step,
  measured on a monitor that takes histograms every step;
* ``detect_anomaly``: the step under ``torch.autograd.detect_anomaly()``.

Steps alternate between the set-ups (one step each per round, in rotating order) so that
all of them see the same machine load; the overhead is the median over rounds of the
paired ratio to ``none``. On a shared machine, ``--threads 1 --clock cpu`` times each step
by the process's CPU time, which other processes do not inflate.

    python benchmarks/monitor_overhead.py                           # 20 rounds on CPU
    python benchmarks/monitor_overhead.py --quick                   # 6 rounds
    python benchmarks/monitor_overhead.py --threads 1 --clock cpu   # on a busy machine
    python benchmarks/monitor_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from finite.monitor import Monitor

VOCAB = 1000


class Transformer(nn.Module):
    def __init__(self, layers: int = 6, d_model: int = 256, heads: int = 4, ff: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_setup(
    name: str, device: torch.device, clock: Callable[[], float]
) -> tuple[Callable[..., float], Monitor | None]:
    torch.manual_seed(0)
    model = Transformer().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    monitor = None
    if name == "monitor":
        monitor = Monitor(model, optimizer, every=1, sync_every=10, histograms_every=0)
    elif name == "histogram step":
        monitor = Monitor(model, optimizer, every=1, sync_every=10, histograms_every=1)
    anomaly = name == "detect_anomaly"

    def step(tokens: torch.Tensor, targets: torch.Tensor) -> float:
        synchronize(device)
        start = clock()
        context = torch.autograd.detect_anomaly() if anomaly else contextlib.nullcontext()
        with context:
            logits = model(tokens)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if monitor is not None:
            monitor.step(loss)
        synchronize(device)
        return clock() - start

    return step, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per set-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="6 rounds, 1 warm-up round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (use with --threads 1)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    if args.quick:
        args.rounds, args.warmup = 6, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    names = ["none", "monitor", "histogram step", "detect_anomaly"]
    setups = {name: make_setup(name, device, clock) for name in names}
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.warmup + args.rounds):
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=generator).to(device)
        targets = torch.randint(0, VOCAB, (args.batch, args.seq), generator=generator).to(device)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = setups[name][0](tokens, targets)
            if round_index >= args.warmup:
                times[name].append(elapsed)
    for _, monitor in setups.values():
        if monitor is not None:
            monitor.close()

    base = times["none"]
    histogram_extra = statistics.median(
        h - m for h, m in zip(times["histogram step"], times["monitor"], strict=True)
    )
    rows = [
        ("none", base),
        ("Monitor(every=1, sync_every=10)", times["monitor"]),
        (
            "Monitor(..., histograms_every=100)",
            [m + histogram_extra / 100 for m in times["monitor"]],
        ),
        ("torch.autograd.detect_anomaly", times["detect_anomaly"]),
    ]
    threads = torch.get_num_threads()
    print(
        f"6-layer transformer, d_model 256, seq {args.seq}, batch {args.batch}, "
        f"{device.type}, {threads} threads, {args.rounds} rounds, {args.clock} clock"
    )
    print(f"{'set-up':38s} {'median ms':>10s} {'mean ms':>10s} {'vs none':>8s}")
    for label, values in rows:
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(
            f"{label:38s} {statistics.median(values) * 1e3:10.1f} "
            f"{statistics.fmean(values) * 1e3:10.1f} {ratio:8.3f}x"
        )
    print(
        f"histogram step (every parameter's weights and gradients): "
        f"+{histogram_extra * 1e3:.1f} ms, amortised over 100 steps"
    )


if __name__ == "__main__":
    main()
