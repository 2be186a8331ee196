"""ZClip per step: finite's device-side ZClip against the reference ``zclip`` package.

Both clip the same gradients (~50M float32 elements in ~100 tensors by default) on the
same sequence of norms (a steady trace with two spikes), alternating step by step so both
see the same machine state. For each, the run prints the median time per step, how many
times per step a tensor value was read on the host (``.item()``, ``.tolist()``,
``bool()``, ``float()``, ...: each one a device synchronisation on a GPU), and whether
the two took the same clipping decisions. ``torch.nn.utils.clip_grad_norm_`` is timed
alongside for scale (one norm pass and one multiply).

On the CPU, finite's ZClip reads its clipped flag (nothing to wait for there) and skips the
multiply on unclipped steps; "finite.ZClip, device path" times the path it takes on a GPU
(no read, the multiply every step) on the same CPU.

    pip install zclip --no-deps                      # the reference (needs only torch)
    python benchmarks/adaptive_clipping.py           # CPU, 50M elements, 30 steps
    python benchmarks/adaptive_clipping.py --numel 5000000 --steps 12   # a quick look
    python benchmarks/adaptive_clipping.py --device cuda
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
from unittest import mock

import numpy as np
import torch

import finite.clipping.zclip as zclip_module
from finite.clipping.norms import total_norm
from finite.clipping.zclip import ZClip

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def counted_host_reads():
    """Count every way a tensor's value reaches the host while the block runs."""
    counts: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counting(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class Gradients(torch.nn.Module):
    """``tensors`` parameters of varied sizes, ``numel`` elements in all, with gradients."""

    def __init__(self, numel: int, tensors: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        rng = np.random.default_rng(0)
        weights = rng.lognormal(0.0, 1.0, tensors)
        sizes = np.maximum(1, (weights / weights.sum() * numel).astype(np.int64))
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.params = torch.nn.ParameterList()
        self.pristine = []
        for size in sizes.tolist():
            cols = 1024 if size >= 1024 else size
            shape = (max(1, size // cols), cols)
            param = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            grad = torch.randn(shape, generator=generator).to(device, dtype)
            self.pristine.append(grad)
            param.grad = torch.empty_like(grad)
            self.params.append(param)
        norm = total_norm(self.pristine).item()
        for grad in self.pristine:
            grad.div_(norm)  # unit total norm: a step's factor is its norm

    def set_gradients(self, norm: float) -> None:
        """Gradients with total norm ``norm`` (one pass, outside the timed region)."""
        for param, grad in zip(self.params, self.pristine, strict=True):
            torch.mul(grad, norm, out=param.grad)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]


def norm_trace(steps: int) -> list[float]:
    """A steady norm around 0.5 (below max_grad_norm=1) with spikes of 8x and 20x."""
    rng = np.random.default_rng(1)
    trace = 0.5 * rng.lognormal(0.0, 0.05, steps)
    for step, factor in ((steps * 2 // 3, 8.0), (steps - 3, 20.0)):
        trace[step] *= factor
    return trace.tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, collections.Counter]:
    synchronize(device)
    with counted_host_reads() as reads:
        start = time.perf_counter()
        fn()
        synchronize(device)  # waits for the device without reading a tensor: not counted
        elapsed = time.perf_counter() - start
    return elapsed, collections.Counter(reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5, help="ZClip's warmup")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    try:
        import zclip
    except ImportError as error:
        raise SystemExit("the reference is needed: pip install zclip --no-deps") from error

    model = Gradients(args.numel, args.tensors, device, dtype)
    numel = sum(p.numel() for p in model.params)
    ours = ZClip(warmup_steps=args.warmup_steps)
    theirs = zclip.ZClip(warmup_steps=args.warmup_steps)
    trace = norm_trace(args.steps)
    print(
        f"ZClip per step on {device} ({torch.get_num_threads()} threads): {numel / 1e6:.1f}M "
        f"{args.dtype} gradient elements in {len(model.params)} tensors, {args.steps} steps, "
        f"warmup_steps={args.warmup_steps}, torch {torch.__version__}"
    )

    device_path = ZClip(warmup_steps=args.warmup_steps) if device.type == "cpu" else None

    def on_device_path():
        with mock.patch.object(zclip_module, "host_reads_are_free", lambda *_: False):
            device_path(model.params)

    names = ["finite.ZClip", "zclip package", "torch clip"]
    if device_path is not None:
        names.insert(1, "finite.ZClip, device path")
    times: dict[str, list[float]] = {name: [] for name in names}
    reads: dict[str, collections.Counter] = {name: collections.Counter() for name in names}
    agree = 0
    clipped_steps = 0

    def measure(name, fn, norm):
        model.set_gradients(norm)
        elapsed, counts = timed(fn, device)
        times[name].append(elapsed)
        reads[name] += counts
        return total_norm(model.grads()).item()  # the clipped norm, outside the timing

    for norm in trace:
        ours_after = measure("finite.ZClip", lambda: ours(model.params), norm)
        if device_path is not None:
            device_after = measure("finite.ZClip, device path", on_device_path, norm)
            assert np.isclose(device_after, ours_after, rtol=1e-6)
        theirs_after = measure("zclip package", lambda: theirs.step(model), norm)
        measure("torch clip", lambda: torch.nn.utils.clip_grad_norm_(model.params, 1.0), norm)

        ours_clipped = ours_after < norm * (1 - 1e-6)
        theirs_clipped = theirs_after < norm * (1 - 1e-6)
        agree += ours_clipped == theirs_clipped and np.isclose(ours_after, theirs_after, rtol=1e-5)
        clipped_steps += ours_clipped

    width = max(map(len, names)) + 2
    print(f"\n{'':{width}}{'median ms/step':>16}{'host reads/step':>18}   reads by kind")
    for name, samples in times.items():
        median = statistics.median(samples) * 1e3
        per_step = sum(reads[name].values()) / args.steps
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(reads[name].items()) if v) or "-"
        print(f"{name:{width}}{median:16.2f}{per_step:18.2f}   {kinds}")
    print()
    reference = statistics.median(times["zclip package"])
    for name in names:
        if name != "zclip package":
            ratio = reference / statistics.median(times[name])
            print(f"zclip package time / {name} time: {ratio:.2f}x")
    print(
        f"same decision and clipped norm on {agree}/{args.steps} steps "
        f"({clipped_steps} clipped by finite.ZClip)"
    )


if __name__ == "__main__":
    main()
