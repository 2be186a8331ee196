"""Peak memory and time of finite.memory against PyTorch, side by side in one run.

Every case (one method at one size) runs in a fresh Python process, so that no cached
allocation of an earlier case hides a peak. The child builds its inputs, runs the case once
on a small input (kernel selection, thread pools), then measures forward + backward steps:

* tensor peak (the targets are judged on it). CPU: the most bytes held by PyTorch's CPU
  allocator during one step, from the allocation records of ``torch.profiler`` with
  ``profile_memory=True`` (each record carries the allocator's running total), minus the
  total before the step. CUDA: ``torch.cuda.max_memory_allocated`` growth.
* RSS peak (CPU only): growth of the process's peak resident set (``VmHWM`` in
  ``/proc/self/status``, reset through ``/proc/self/clear_refs``) over one step. It adds
  what the C library's allocator keeps and page granularity.

Both include the gradients the step returns, the same for every method. The time is the
best wall time over ``--repeats`` steps in each of ``--rounds`` children (cases interleaved
round by round, so that every method sees the same machine load; on a shared machine the
minimum is the least disturbed sample); the profiled step is not timed.

    python benchmarks/memory.py                 # the sizes of the targets (several minutes)
    python benchmarks/memory.py --quick         # smaller sizes, one round (about a minute)
    python benchmarks/memory.py --only lce      # lce, attention, checkpoint
    python benchmarks/memory.py --threads 1     # one thread per child (a busy machine)
    python benchmarks/memory.py --device cuda

Targets checked at the end:

* linear cross-entropy: peak <= 1/8 of the materialised reference and <= torch's chunked
  ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``; time <= 1.1x it.
* attention: peak <= 1/8 of the naive (materialised scores) version; time <= 1.5x SDPA.
* checkpointing: sqrt segments keep >= 4x fewer activation bytes at <= 1.4x step time.

Checkpointed models, 32 blocks each: an MLP (pre-norm residual blocks), PyTorch's
``nn.TransformerEncoderLayer`` (post-norm, dropout 0.1 everywhere, attention weights
included), and a GPT-2-style pre-norm block (causal ``F.scaled_dot_product_attention``,
dropout 0.1 on the residual branches only).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import finite
from finite.memory import (
    activation_memory,
    attention,
    checkpoint_sequential,
    linear_cross_entropy,
    plan_checkpointing,
)

# --------------------------------------------------------------------------------------
# measuring, in the child
# --------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMeter:
    """Peak memory of a block of code: CUDA allocator or the process's resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMeter:
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Most bytes the tensor allocator holds during ``step``, above what it held before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    records = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            fields = event.typed[1]
            records.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not records:
        return 0
    records.sort()
    _, first_size, first_total = records[0]
    return max(total for _, _, total in records) - (first_total - first_size)


def measure(
    step: Callable[[], None], warmup: Callable[[], None], repeats: int, device: torch.device
) -> dict:
    warmup()
    times = []
    with PeakMeter(device) as meter:
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    for _ in range(repeats - 1):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "peak_bytes": tensor_peak_bytes(step, device),
        "rss_peak_bytes": meter.peak if device.type == "cpu" else None,
        "times": times,
    }


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------


def lce_case(method: str, tokens: int, hidden: int, vocab: int, dtype: str, device, repeats):
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)

    def inputs(n):
        h = (torch.randn(n, hidden, generator=gen) / math.sqrt(hidden)).to(device, dt)
        w = torch.randn(vocab, hidden, generator=gen).to(device, dt)
        t = torch.randint(0, vocab, (n,), generator=gen).to(device)
        return h.requires_grad_(), w.requires_grad_(), t

    def run(h, w, t):
        h.grad = w.grad = None
        if method == "materialised":
            loss = F.linear_cross_entropy(h, w, t)  # options=None: PyTorch's reference
        elif method == "torch-chunked":
            loss = F.linear_cross_entropy(h, w, t, options=nn.LinearCrossEntropyOptions())
        else:
            loss = linear_cross_entropy(h, w, t)
        loss.backward()

    small = inputs(min(tokens, 256))
    big = inputs(tokens)
    return measure(lambda: run(*big), lambda: run(*small), repeats, device)


def naive_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def attention_case(method: str, heads: int, length: int, dim: int, dtype: str, device, repeats):
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    fn = {
        "naive": naive_attention,
        "sdpa": F.scaled_dot_product_attention,
        "finite": attention,
    }[method]

    def inputs(n):
        return [
            torch.randn(1, heads, n, dim, generator=gen).to(device, dt).requires_grad_()
            for _ in range(3)
        ]

    def run(q, k, v):
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).sum().backward()

    small = inputs(min(length, 256))
    big = inputs(length)
    return measure(lambda: run(*big), lambda: run(*small), repeats, device)


class MLPBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class PreNormBlock(nn.Module):
    """GPT-2-style pre-norm block: causal self-attention through
    F.scaled_dot_product_attention and a GELU MLP, dropout on both residual branches and
    none on the attention weights (the fused attention kernels draw that one themselves)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))
        return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))


def checkpoint_model(model_name: str, size: dict) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(*(MLPBlock(size["width"]) for _ in range(size["blocks"])))
        x = torch.randn(size["tokens"], size["width"])
    elif model_name == "prenorm":
        model = nn.Sequential(
            *(PreNormBlock(size["width"], size["heads"], 0.1) for _ in range(size["blocks"]))
        )
        x = torch.randn(size["batch"], size["length"], size["width"])
    else:
        # nn.TransformerEncoderLayer (post-norm) with PyTorch's default dropout, attention
        # weights included: on CPU that dropout sends attention down the math path.
        layer = lambda: nn.TransformerEncoderLayer(  # noqa: E731
            size["width"], size["heads"], 4 * size["width"], dropout=0.1, batch_first=True
        )
        model = nn.Sequential(*(layer() for _ in range(size["blocks"])))
        x = torch.randn(size["batch"], size["length"], size["width"])
    return model, x


def checkpoint_case(model_name: str, mode: str, size: dict, device, repeats):
    model, x = checkpoint_model(model_name, size)
    model, x = model.to(device), x.to(device)
    baseline = activation_memory(model, x).total_bytes
    plan = None
    if mode == "sqrt":
        checkpoint_sequential(model, "sqrt")
    elif mode == "planner":
        plan = plan_checkpointing(model, x, budget_bytes=int(baseline * size["budget"]))
        plan.apply(model)
    saved = activation_memory(model, x).total_bytes

    def run():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    result = measure(run, run, repeats, device)
    result["activation_bytes"] = saved
    if plan is not None:
        blocks = sum(_blocks_in(name) for name in plan.chosen)
        result["planned"] = (
            f"{blocks}/{len(plan.candidates)} blocks in {len(plan.chosen)} regions, {plan.method}"
        )
        result["predicted_bytes"] = plan.predicted_bytes
        result["recompute_bytes"] = plan.recompute_bytes
    return result


def checkpoint_timing_case(model_name: str, size: dict, device, repeats):
    """Step times of the three modes in one process, one step of each in turn.

    On a shared machine the load drifts over the minutes between two children; steps
    taken in turn see the same load, so their ratios stay meaningful.
    """
    plain, x = checkpoint_model(model_name, size)
    plain, x = plain.to(device), x.to(device)
    models = {"none": plain, "sqrt": checkpoint_sequential(copy.deepcopy(plain), "sqrt")}
    budget = int(activation_memory(plain, x).total_bytes * size["budget"])
    planned = copy.deepcopy(plain)
    plan_checkpointing(planned, x, budget_bytes=budget).apply(planned)
    models["planner"] = planned

    def step(model):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    for model in models.values():
        step(model)
    times: dict[str, list[float]] = {mode: [] for mode in models}
    forwards = []
    for _ in range(repeats + 2):
        for mode, model in models.items():
            _sync(device)
            start = time.perf_counter()
            step(model)
            _sync(device)
            times[mode].append(time.perf_counter() - start)
        # Recomputation costs forward time: its share of a step bounds the slowdown.
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            plain(x)
        _sync(device)
        forwards.append(time.perf_counter() - start)
    return {"step_times": times, "forward_seconds": min(forwards)}


def _blocks_in(name: str) -> int:
    """1 for a module path, ``stop - start`` for a segment ``"[start:stop]"``."""
    if name.endswith("]"):
        start, stop = name[name.rindex("[") + 1 : -1].split(":")
        return int(stop) - int(start)
    return 1


def run_child(spec: dict) -> dict:
    device = torch.device(spec["device"])
    repeats = spec["repeats"]
    if spec["kind"] == "lce":
        return lce_case(
            spec["method"], *spec["shape"], spec["dtype"], device=device, repeats=repeats
        )
    if spec["kind"] == "attention":
        return attention_case(
            spec["method"], *spec["shape"], spec["dtype"], device=device, repeats=repeats
        )
    if spec["kind"] == "checkpoint-time":
        return checkpoint_timing_case(spec["model"], spec["size"], device, repeats)
    return checkpoint_case(spec["model"], spec["method"], spec["size"], device, repeats)


# --------------------------------------------------------------------------------------
# the parent: cases, rounds, table
# --------------------------------------------------------------------------------------


def build_specs(args) -> list[dict]:
    quick = args.quick
    lce_shape = (2048, 256, 8192) if quick else (8192, 512, 32768)
    attention_shape = (8, 1024, 64) if quick else (8, 4096, 64)
    # 32 blocks each: sqrt(32) -> 6 segments, the depth at which Chen et al.'s O(sqrt n)
    # saving exceeds the 4x target (the last, unchecked segment keeps 1/6 of the blocks).
    mlp = {"blocks": 32, "width": 128 if quick else 256, "tokens": 1024 if quick else 2048}
    transformer = {"blocks": 32, "width": 64 if quick else 128, "heads": 4, "batch": 4}
    transformer["length"] = 128 if quick else 256
    mlp["budget"] = transformer["budget"] = args.budget
    specs = []
    base = {"device": args.device, "repeats": args.repeats}
    if "lce" in args.only:
        for dtype in args.dtypes:
            for method in ("materialised", "torch-chunked", "finite"):
                specs.append(
                    {**base, "kind": "lce", "method": method, "dtype": dtype, "shape": lce_shape}
                )
    if "attention" in args.only:
        for dtype in args.dtypes:
            for method in ("naive", "sdpa", "finite"):
                specs.append(
                    {
                        **base,
                        "kind": "attention",
                        "method": method,
                        "dtype": dtype,
                        "shape": attention_shape,
                    }
                )
    if "checkpoint" in args.only:
        for model_name, size in (
            ("mlp", mlp),
            ("transformer", transformer),
            ("prenorm", transformer),
        ):
            for method in ("none", "sqrt", "planner"):
                specs.append(
                    {
                        **base,
                        "kind": "checkpoint",
                        "model": model_name,
                        "method": method,
                        "size": size,
                        "dtype": "float32",
                    }
                )
            specs.append(
                {
                    **base,
                    "kind": "checkpoint-time",
                    "model": model_name,
                    "method": "interleaved",
                    "size": size,
                    "dtype": "float32",
                }
            )
    return specs


def run_in_child(spec: dict, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def key(spec: dict) -> tuple:
    return (spec["kind"], spec.get("model", ""), spec["dtype"], spec["method"])


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(specs: list[dict], results: dict[tuple, list[dict]], args) -> None:
    def med(spec_key, field):
        if field == "seconds":  # the best step of all children
            return min(t for r in results[spec_key] for t in r["times"])
        values = [r[field] for r in results[spec_key] if r.get(field) is not None]
        return statistics.median(values) if values else math.nan

    print()
    kinds = [k for k in ("lce", "attention") if k in args.only]
    references = {"lce": ("materialised", "torch-chunked"), "attention": ("naive", "sdpa")}
    for kind in kinds:
        shape = next(s["shape"] for s in specs if s["kind"] == kind)
        label = "tokens, hidden, vocab" if kind == "lce" else "heads, sequence, head dim"
        print(f"## {kind}  ({label} = {tuple(shape)}), forward + backward")
        print(
            f"{'dtype':<10}{'method':<15}{'peak MiB':>10}{'RSS MiB':>9}{'time s':>9}"
            f"{'peak/ref':>10}{'peak/torch':>11}{'time/torch':>11}"
        )
        for dtype in args.dtypes:
            ref_name, torch_name = references[kind]
            ref_peak = med((kind, "", dtype, ref_name), "peak_bytes")
            torch_peak = med((kind, "", dtype, torch_name), "peak_bytes")
            torch_time = med((kind, "", dtype, torch_name), "seconds")
            for method in (ref_name, torch_name, "finite"):
                k = (kind, "", dtype, method)
                peak, seconds = med(k, "peak_bytes"), med(k, "seconds")
                print(
                    f"{dtype:<10}{method:<15}{mib(peak):>10}{mib(med(k, 'rss_peak_bytes')):>9}"
                    f"{seconds:>9.3f}{peak / ref_peak:>10.3f}{peak / torch_peak:>11.3f}"
                    f"{seconds / torch_time:>11.3f}"
                )
            ours = (kind, "", dtype, "finite")
            peak, seconds = med(ours, "peak_bytes"), med(ours, "seconds")
            if kind == "lce":
                print(
                    f"  targets: peak <= ref/8 {verdict(peak <= ref_peak / 8)}, "
                    f"peak <= torch chunked {verdict(peak <= torch_peak)}, "
                    f"time <= 1.1x torch chunked {verdict(seconds <= 1.1 * torch_time)}"
                )
            else:
                print(
                    f"  targets: peak <= naive/8 {verdict(peak <= ref_peak / 8)}, "
                    f"time <= 1.5x SDPA {verdict(seconds <= 1.5 * torch_time)}"
                )
        print()
    if "checkpoint" in args.only:
        print(f"## checkpointing (float32 training step; planner budget {args.budget:.0%})")
        print(
            f"{'model':<13}{'mode':<9}{'saved MiB':>10}{'peak MiB':>10}{'RSS MiB':>9}"
            f"{'step s':>9}{'saved/none':>11}{'peak/none':>10}{'time/none':>10}  plan"
        )
        for model_name in ("mlp", "transformer", "prenorm"):
            timing = results[("checkpoint-time", model_name, "float32", "interleaved")]

            def step_seconds(mode, timing=timing):  # the best step taken in turn
                return min(t for r in timing for t in r["step_times"][mode])

            none = ("checkpoint", model_name, "float32", "none")
            none_saved, none_time = med(none, "activation_bytes"), step_seconds("none")
            none_peak = med(none, "peak_bytes")
            for mode in ("none", "sqrt", "planner"):
                k = ("checkpoint", model_name, "float32", mode)
                saved, seconds = med(k, "activation_bytes"), step_seconds(mode)
                note = results[k][0].get("planned", "")
                if "predicted_bytes" in results[k][0]:
                    note += (
                        f"; predicted {mib(results[k][0]['predicted_bytes'])} MiB, "
                        f"+{mib(results[k][0]['recompute_bytes'])} MiB recomputed at once"
                    )
                peak = med(k, "peak_bytes")
                print(
                    f"{model_name:<13}{mode:<9}{mib(saved):>10}{mib(peak):>10}"
                    f"{mib(med(k, 'rss_peak_bytes')):>9}{seconds:>9.3f}"
                    f"{saved / none_saved:>11.3f}{peak / none_peak:>10.3f}"
                    f"{seconds / none_time:>10.3f}  {note}"
                )
            sqrt = ("checkpoint", model_name, "float32", "sqrt")
            ratio = none_saved / med(sqrt, "activation_bytes")
            slowdown = step_seconds("sqrt") / none_time
            forward_share = min(r["forward_seconds"] for r in timing) / none_time
            print(
                f"  targets: sqrt saves >= 4x {verdict(ratio >= 4)} ({ratio:.2f}x), "
                f"step time <= 1.4x {verdict(slowdown <= 1.4)} ({slowdown:.2f}x); "
                f"a forward (no grad) is {forward_share:.0%} of a step"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    parser.add_argument("--rounds", type=int, default=None, help="children per case (3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per child")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="+", default=["lce", "attention", "checkpoint"])
    parser.add_argument("--budget", type=float, default=0.25, help="planner budget / baseline")
    parser.add_argument("--threads", type=int, default=None, help="threads per child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    specs = build_specs(args)
    threads = args.threads or torch.get_num_threads()
    print(
        f"device={args.device} torch={torch.__version__} finite={finite.__version__} "
        f"threads={threads} cpus={os.cpu_count()} rounds={rounds} "
        f"repeats={args.repeats} quick={args.quick}"
    )
    if args.device == "cpu":
        print(
            "peak = CPU tensor allocator's peak over one step (torch.profiler allocation "
            "records); RSS = growth of the child's peak resident set (VmHWM)"
        )
    else:
        print("peak = torch.cuda.max_memory_allocated growth over one step")
    print("time = best step over all children and repeats")
    results: dict[tuple, list[dict]] = {}
    for round_index in range(rounds):
        for spec in specs:
            result = run_in_child(spec, args.threads)
            results.setdefault(key(spec), []).append(result)
            if spec["kind"] == "checkpoint-time":
                best = ", ".join(f"{m} {min(t):.3f} s" for m, t in result["step_times"].items())
                print(
                    f"round {round_index + 1}: {spec['kind']:<10} {spec['model']:<12}"
                    f"{spec['dtype']:<9} steps in turn: {best}",
                    flush=True,
                )
                continue
            rss = result["rss_peak_bytes"]
            print(
                f"round {round_index + 1}: {spec['kind']:<10} {spec.get('model', ''):<12}"
                f"{spec['dtype']:<9} {spec['method']:<14} peak {mib(result['peak_bytes']):>9} "
                f"MiB  RSS {mib(rss) if rss is not None else '-':>9} MiB  "
                f"best {min(result['times']):.3f} s",
                flush=True,
            )
    report(specs, results, args)


if __name__ == "__main__":
    main()
