"""Time finite's gradient clipping against PyTorch's, side by side in one run.

On the same gradients (by default ~50M float32 elements in 100 tensors):

* ``clip_grad_norm_``: ``finite.clip_grad_norm_`` vs ``torch.nn.utils.clip_grad_norm_``
  (the ratio torch / ours should be >= 0.95: no slower);
* fused unscale + clip: ``LossScaler.unscale_(optimizer, clip_norm=1.0)`` vs
  ``torch.amp.GradScaler.unscale_`` followed by ``clip_grad_norm_`` (target >= 1.4x);

and each against the memory-bandwidth floor: the bytes that must move (read every gradient
for the norm, then read and write it once to scale it: 3 x the gradient bytes) divided by
the bandwidth of a plain tensor copy measured in the same run. Ours and PyTorch's alternate
within each repeat, so both see the same machine state; medians over the repeats.

    python benchmarks/clipping.py                    # CPU, 50M elements in 100 tensors
    python benchmarks/clipping.py --device cuda      # on a GPU
    python benchmarks/clipping.py --elements 5e6 --repeats 5   # a quick look
    python benchmarks/clipping.py --threads 1       # steadier on a shared machine

Further comparisons on the same gradients go in ``COMPARISONS`` (see there).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import finite.clipping
from finite.scaling import LossScaler

SCALE = 2.0**16
MAX_NORM = 1.0


@dataclass
class Setup:
    """The gradients every comparison runs on, and how to time a function on them."""

    params: list[torch.nn.Parameter]
    originals: list[torch.Tensor]  # scaled gradients, restored before every timed call
    device: torch.device
    repeats: int
    bandwidth_bytes_per_s: float

    @property
    def grad_bytes(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params)

    def restore(self) -> None:
        for p, original in zip(self.params, self.originals, strict=True):
            p.grad.copy_(original)

    def floor_seconds(self, passes: float) -> float:
        """Time to move ``passes`` x the gradient bytes at the measured copy bandwidth."""
        return passes * self.grad_bytes / self.bandwidth_bytes_per_s


@dataclass
class Row:
    """One comparison: median seconds of ours and of the reference, and the floor."""

    name: str
    ours_s: float
    theirs_s: float
    floor_s: float | None
    target: str


Comparison = Callable[[Setup], list[Row]]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(
    setup: Setup,
    ours: Callable[[], Callable[[], object]],
    theirs: Callable[[], Callable[[], object]],
) -> tuple[float, float]:
    """Median seconds of ``ours()()`` and ``theirs()()``, alternating; each outer call
    prepares (untimed) and returns the call that is timed. Gradients are restored first."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for repeat in range(setup.repeats + 1):  # the first round warms up
        order = [("ours", ours), ("theirs", theirs)]
        if repeat % 2:
            order.reverse()
        for name, prepare in order:
            setup.restore()
            call = prepare()
            elapsed = timed(call, setup.device)
            if repeat:
                times[name].append(elapsed)
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


# ----------------------------------------------------------------------------- comparisons
def compare_clip_grad_norm(setup: Setup) -> list[Row]:
    params = setup.params
    ours, theirs = side_by_side(
        setup,
        lambda: lambda: finite.clipping.clip_grad_norm_(params, MAX_NORM),
        lambda: lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM),
    )
    # A norm needs every value before any can be scaled: one read, then a read and a write.
    return [Row("clip_grad_norm_", ours, theirs, setup.floor_seconds(3), ">= 0.95")]


def compare_fused_unscale(setup: Setup) -> list[Row]:
    params = setup.params
    optimizer = torch.optim.SGD(params, lr=0.0)
    one = torch.ones((), device=setup.device)

    def ours() -> Callable[[], object]:
        scaler = LossScaler(init_scale=SCALE)
        scaler.scale(one)  # creates the scale on the device, untimed
        return lambda: scaler.unscale_(optimizer, clip_norm=MAX_NORM)

    def theirs() -> Callable[[], object]:
        scaler = torch.amp.GradScaler(setup.device.type, init_scale=SCALE)
        scaler.scale(one)

        def two_step() -> object:
            scaler.unscale_(optimizer)
            return torch.nn.utils.clip_grad_norm_(params, MAX_NORM)

        return two_step

    ours_s, theirs_s = side_by_side(setup, ours, theirs)
    name = "unscale_ + clip (fused vs GradScaler.unscale_ + clip_grad_norm_)"
    return [Row(name, ours_s, theirs_s, setup.floor_seconds(3), ">= 1.4")]


#: Every comparison this script runs, in order. Each takes the shared :class:`Setup` (the
#: gradients, the device, the repeat count, the measured copy bandwidth) and returns rows.
#: To add one (e.g. the ZClip comparison in ``benchmarks/adaptive_clipping.py``), append a
#: function ``compare_x(setup: Setup) -> list[Row]`` here; ``side_by_side`` times two calls
#: alternately, restoring the gradients before each.
COMPARISONS: list[Comparison] = [compare_clip_grad_norm, compare_fused_unscale]


# ----------------------------------------------------------------------------- setup
def tensor_sizes(total: int, count: int) -> list[int]:
    """``count`` sizes summing to ``total``, spread from small to large like a model's
    parameters (biases and norms to big matrices)."""
    weights = [1.0 + 30.0 * (i / max(count - 1, 1)) ** 2 for i in range(count)]
    sizes = [max(1, int(total * w / sum(weights))) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (each byte read once, written once)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.numel() * src.element_size() / seconds


def make_setup(elements: int, tensors: int, device: torch.device, repeats: int) -> Setup:
    generator = torch.Generator(device=device).manual_seed(0)
    params, originals = [], []
    for size in tensor_sizes(elements, tensors):
        param = torch.nn.Parameter(torch.zeros(size, device=device))
        # Unscaled gradients of 1e-3: the total norm (~1e-3 * sqrt(elements)) exceeds
        # MAX_NORM, so clipping scales; SCALE times that stays far from float32's limits.
        original = torch.randn(size, generator=generator, device=device) * (1e-3 * SCALE)
        param.grad = original.clone()
        params.append(param)
        originals.append(original)
    grad_bytes = sum(o.numel() * o.element_size() for o in originals)
    bandwidth = copy_bandwidth(grad_bytes, device, max(repeats, 5))
    return Setup(params, originals, device, repeats, bandwidth)


def report(rows: list[Row], setup: Setup) -> None:
    count = len(setup.params)
    elements = sum(p.numel() for p in setup.params)
    print(
        f"device {setup.device}, {elements / 1e6:.1f}M float32 gradient elements in {count} "
        f"tensors ({setup.grad_bytes / 2**20:.0f} MiB), {torch.get_num_threads()} threads, "
        f"median of {setup.repeats}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"copy bandwidth {setup.bandwidth_bytes_per_s / 1e9:.2f} GB/s (read + write); "
        f"load average {load} on {os.cpu_count()} CPUs (others' load makes times noisy)"
    )
    header = f"{'case':<66} {'ours ms':>9} {'torch ms':>9} {'speed-up':>9} {'target':>8}"
    print(header + f" {'floor ms':>9} {'ours/floor':>10} {'torch/floor':>11}")
    for row in rows:
        line = (
            f"{row.name:<66} {row.ours_s * 1e3:9.2f} {row.theirs_s * 1e3:9.2f} "
            f"{row.theirs_s / row.ours_s:8.2f}x {row.target:>8}"
        )
        if row.floor_s is not None:
            line += (
                f" {row.floor_s * 1e3:9.2f} {row.ours_s / row.floor_s:9.2f}x"
                f" {row.theirs_s / row.floor_s:10.2f}x"
            )
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--elements", type=float, default=50e6, help="gradient elements in all")
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = make_setup(int(args.elements), args.tensors, device, args.repeats)
    rows = [row for comparison in COMPARISONS for row in comparison(setup)]
    report(rows, setup)


if __name__ == "__main__":
    main()
