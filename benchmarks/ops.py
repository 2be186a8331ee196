"""Time finite.ops against PyTorch's equivalents, side by side in one run.

Each case runs forward + backward (forward only for sums) on the same input,
alternating ours and PyTorch's so that both see the same machine state, and
prints the median times and their ratio. On CUDA the peak memory of each is
printed too.

    python benchmarks/ops.py                      # CPU, (4096, 32768), float32 and bfloat16
    python benchmarks/ops.py --device cuda        # on a GPU
    python benchmarks/ops.py --rows 512 --cols 4096 --repeats 5   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from finite import ops

Case = tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable, bool]

CASES: list[Case] = [
    # name, ours(x, target), torch's(x, target), needs backward
    ("logsumexp", lambda x, t: ops.logsumexp(x, -1), lambda x, t: torch.logsumexp(x, -1), True),
    ("softmax", lambda x, t: ops.softmax(x, -1), lambda x, t: torch.softmax(x, -1), True),
    (
        "log_softmax",
        lambda x, t: ops.log_softmax(x, -1),
        lambda x, t: torch.log_softmax(x, -1),
        True,
    ),
    (
        "cross_entropy",
        lambda x, t: ops.cross_entropy(x, t),
        lambda x, t: F.cross_entropy(x, t),
        True,
    ),
    (
        "compensated_sum",
        lambda x, t: ops.compensated_sum(x, -1),
        lambda x, t: torch.sum(x, -1),
        False,
    ),
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn: Callable, x: torch.Tensor, target: torch.Tensor, backward: bool) -> None:
    inp = x.detach().requires_grad_(backward)
    out = fn(inp, target)
    if backward:
        out.backward(torch.ones_like(out))


def time_once(fn, x, target, backward, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run_once(fn, x, target, backward)
    synchronize(device)
    return time.perf_counter() - start


def peak_bytes(fn, x, target, backward, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run_once(fn, x, target, backward)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=32768)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ops", nargs="+", default=[c[0] for c in CASES])
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"shape=({args.rows}, {args.cols}) repeats={args.repeats}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    header = f"{'op':<16}{'dtype':<10}{'finite ms':>11}{'torch ms':>10}{'ratio':>8}"
    if device.type == "cuda":
        header += f"{'finite MiB':>12}{'torch MiB':>11}"
    print(header)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(args.rows, args.cols, device=device, generator=generator).mul_(4)
        x = x.to(dtype)
        target = torch.randint(0, args.cols, (args.rows,), device=device, generator=generator)
        for name, ours, theirs, backward in CASES:
            if name not in args.ops:
                continue
            for _ in range(args.warmup):
                run_once(ours, x, target, backward)
                run_once(theirs, x, target, backward)
            ours_s, theirs_s = [], []
            for _ in range(args.repeats):
                ours_s.append(time_once(ours, x, target, backward, device))
                theirs_s.append(time_once(theirs, x, target, backward, device))
            ours_ms = statistics.median(ours_s) * 1e3
            theirs_ms = statistics.median(theirs_s) * 1e3
            line = (
                f"{name:<16}{dtype_name:<10}{ours_ms:>11.2f}{theirs_ms:>10.2f}"
                f"{ours_ms / theirs_ms:>8.2f}"
            )
            if device.type == "cuda":
                ours_mem = peak_bytes(ours, x, target, backward, device) / 2**20
                theirs_mem = peak_bytes(theirs, x, target, backward, device) / 2**20
                line += f"{ours_mem:>12.0f}{theirs_mem:>11.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
