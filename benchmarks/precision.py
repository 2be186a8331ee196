"""Mixed-precision training side by side: loss scalers on float16, compensated bfloat16 updates.

Part 1, float16. A narrow tanh MLP whose parameters, activations and gradients are
float16 regresses small targets (about 1e-3, as with unnormalised physical units). Its
hidden layers' gradients sit far below float16's smallest subnormal (6e-8): without
loss scaling nearly all of them flush to zero and those layers never learn. Label noise
keeps the gradients from shrinking away as the fit improves, and the scale starts at
2**32, far above what the gradients allow, so the first steps overflow (as GradScaler's
default 2**16 is meant to for typical networks). Float32 master weights
(``finite.MasterWeights``) feed AdamW; the runs differ only in the loss scaling:

* no scaling;
* ``torch.amp.GradScaler``: halve on overflow, double after ``growth_interval``
  overflow-free steps;
* ``finite.LossScaler(strategy="backoff")``: the same rule; its scale sequence equals
  GradScaler's (``max_scale`` raised so that it never binds, as GradScaler has none);
* ``finite.LossScaler(strategy="headroom")``: the next scale is set from the largest
  gradient, ``margin_bits=4`` binades below float16's maximum.

``growth_interval`` is 100 instead of the usual 2000 so that a 4000-step run sees as
many growth attempts as an 80000-step run would: a backoff scaler that sits at the
largest scale the gradients allow overflows once per attempt. Printed, per run and
averaged over seeds: skipped steps (before and after step 200, the initial transient),
the fraction of float16 gradient elements that were exactly zero (flushed: a tanh
network has no true zeros) and subnormal, the final loss on held-out inputs (float32
forward with the trained float16 weights, noise-free targets), and the last scale.

Part 2, bfloat16. Fine-tuning: an MLP starts from "pretrained" bfloat16 weights and must
move each one by about 5% of its size, with AdamW at lr 1e-5. Every update (about lr)
is smaller than half a bfloat16 ulp of a weight of typical size (about 1e-4 here), so
plain bfloat16 AdamW rounds most of them away ("swamping"). Runs: float32 AdamW (the
reference), plain AdamW on bfloat16 parameters, ``finite.compensated(AdamW, "kahan")``
and ``"stochastic"``. Printed: the test loss (label noise + excess over the teacher) and
its ratio to float32, the excess alone, bytes per parameter (weights + optimizer state
+ compensation buffers, summed from the tensors themselves), the optimizer step time
and its ratio to plain bfloat16 with the swamping meter on every step (``meter_every=1``,
the default) and off (``meter_every=0``), and the meter's last reading.

    python benchmarks/precision.py                  # CPU: about 2 minutes on 2 cores
    python benchmarks/precision.py --quick          # under a minute: shorter runs, 1 seed
    python benchmarks/precision.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

import finite
from finite.precision import CompensatedOptimizer, MasterWeights, compensated

# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tanh_mlp(widths: list[int], seed: int, output_gain: float = 1.0) -> torch.nn.Sequential:
    """A float32 tanh MLP, PyTorch's default initialisation, last layer times ``output_gain``."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    with torch.no_grad():
        model[-1].weight.mul_(output_gain)
        model[-1].bias.mul_(output_gain)
    return model


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of ``model``'s weights, as stored, evaluated in float32."""
    params = [p.detach().float() for p in model.parameters()]
    h = x
    for i in range(0, len(params), 2):
        h = torch.nn.functional.linear(h, params[i], params[i + 1])
        if i + 2 < len(params):
            h = torch.tanh(h)
    return (h - y).square().mean().item()


def cosine_lr(step: int, steps: int, peak: float) -> float:
    """Cosine decay from ``peak`` to 0: the final loss is not one point of a noisy plateau."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


# --------------------------------------------------------------------------------------
# Part 1: float16 with loss scaling
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Float16Setup:
    steps: int = 4000
    widths: tuple[int, ...] = (16, 16, 16, 4)
    batch: int = 128
    lr: float = 1e-3
    target_scale: float = 1e-3  # the teacher's last layer is scaled by this
    student_scale: float = 1e-2  # ... and the student's by this
    label_noise: float = 1e-4
    init_scale: float = 2.0**32  # overflows at first
    transient_steps: int = 200  # skips before this step are counted apart
    seed: int = 0
    growth_interval: int = 100
    max_scale: float = 2.0**40  # never binds here, like GradScaler (no maximum)


@dataclass
class Float16Result:
    skipped: int
    skipped_in_transient: int
    zero_fraction: float
    subnormal_fraction: float
    final_loss: float
    final_scale: float | None
    seconds: float


SCALERS = ("none", "GradScaler", "backoff", "headroom")
SCALER_LABELS = {
    "none": "no scaling",
    "GradScaler": "torch.amp.GradScaler",
    "backoff": 'LossScaler("backoff")',
    "headroom": 'LossScaler("headroom")',
}


def make_scaler(kind: str, setup: Float16Setup, device: torch.device):
    if kind == "none":
        return None
    if kind == "GradScaler":
        return torch.amp.GradScaler(
            device.type, init_scale=setup.init_scale, growth_interval=setup.growth_interval
        )
    return finite.LossScaler(
        setup.init_scale,
        strategy=kind,
        growth_interval=setup.growth_interval,
        max_scale=setup.max_scale,
    )


def train_float16(kind: str, setup: Float16Setup, device: torch.device) -> Float16Result:
    widths = list(setup.widths)
    teacher = tanh_mlp(widths, seed=100, output_gain=setup.target_scale).to(device)
    model = tanh_mlp(widths, setup.seed, setup.student_scale).to(device, torch.float16)
    masters = MasterWeights(model.parameters())
    optimizer = torch.optim.AdamW(masters.parameters(), lr=setup.lr, weight_decay=0.0)
    scaler = make_scaler(kind, setup, device)
    data = torch.Generator(device=device).manual_seed(1)
    x_eval = torch.randn(4096, widths[0], device=device, generator=data)
    with torch.no_grad():
        y_eval = teacher(x_eval)
    data.manual_seed(setup.seed + 1)
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    subnormal = torch.zeros((), dtype=torch.int64, device=device)
    elements = 0
    skipped = skipped_in_transient = 0
    start = time.perf_counter()
    for step in range(setup.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, setup.steps, setup.lr)
        x = torch.randn(setup.batch, widths[0], device=device, generator=data)
        with torch.no_grad():
            noise = torch.randn(setup.batch, widths[-1], device=device, generator=data)
            y = teacher(x) + setup.label_noise * noise
        # float16 forward and backward; the loss itself in float32, as autocast would.
        loss = (model(x.half()).float() - y).square().mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        grads = [p.grad for p in model.parameters()]
        zeros += sum(g.eq(0).sum() for g in grads)
        subnormal += sum((g.abs() < 2.0**-14).sum() for g in grads)
        elements += sum(g.numel() for g in grads)
        masters.accumulate_grads_()
        if scaler is None:
            optimizer.step()
            stepped = True
        elif isinstance(scaler, torch.amp.GradScaler):
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale_before  # GradScaler shrinks only on a skip
        else:
            stepped = scaler.step(optimizer)
            scaler.update()
        skipped += not stepped
        skipped_in_transient += not stepped and step < setup.transient_steps
        if stepped:
            masters.copy_to_model_()
        masters.zero_grad()
    synchronize(device)
    seconds = time.perf_counter() - start
    return Float16Result(
        skipped=skipped,
        skipped_in_transient=skipped_in_transient,
        zero_fraction=zeros.item() / elements,
        subnormal_fraction=(subnormal - zeros).item() / elements,
        final_loss=held_out_loss(model, x_eval, y_eval),
        final_scale=None if scaler is None else scaler.get_scale(),
        seconds=seconds,
    )


def report_float16(setup: Float16Setup, runs: dict[str, list[Float16Result]]) -> None:
    seeds = len(runs["backoff"])
    print(
        f"\n## float16: MLP {list(setup.widths)}, {setup.steps} steps, batch {setup.batch}, "
        f"AdamW lr {setup.lr:g} (cosine to 0), float32 master weights, {seeds} seed(s)\n"
        f"init_scale 2**{math.log2(setup.init_scale):g}, growth_interval "
        f"{setup.growth_interval}, LossScaler max_scale 2**{math.log2(setup.max_scale):g}, "
        "headroom margin_bits 4. Per run, averaged over the seeds:"
    )
    transient, after = f"<{setup.transient_steps}", f">={setup.transient_steps}"
    print(
        f"{'scaler':<24}{'skipped':>8}{transient:>7}{after:>7}{'zero grads':>12}"
        f"{'subnormal':>11}{'final loss':>12}{'vs backoff':>11}{'last scale':>12}{'s/run':>7}"
    )

    def mean(values: Iterable[float]) -> float:
        return statistics.fmean(values)

    backoff_loss = mean(r.final_loss for r in runs["backoff"])
    for kind, results in runs.items():
        skipped = mean(r.skipped for r in results)
        early = mean(r.skipped_in_transient for r in results)
        loss = mean(r.final_loss for r in results)
        last = results[0].final_scale
        scale = "-" if last is None else f"2**{math.log2(last):g}"
        print(
            f"{SCALER_LABELS[kind]:<24}{skipped:>8.1f}{early:>7.1f}{skipped - early:>7.1f}"
            f"{mean(r.zero_fraction for r in results):>12.3%}"
            f"{mean(r.subnormal_fraction for r in results):>11.3%}"
            f"{loss:>12.4e}{loss / backoff_loss:>11.4f}{scale:>12}"
            f"{mean(r.seconds for r in results):>7.1f}"
        )
    headroom_skips = sum(r.skipped for r in runs["headroom"])
    backoff_skips = sum(r.skipped for r in runs["backoff"])
    skip_ratio = headroom_skips / backoff_skips if backoff_skips else math.nan
    loss_ratio = mean(r.final_loss for r in runs["headroom"]) / backoff_loss
    per_seed = ", ".join(
        f"{h.final_loss / b.final_loss:.4f}"
        for h, b in zip(runs["headroom"], runs["backoff"], strict=True)
    )
    print(
        f"headroom vs backoff: skips {headroom_skips}/{backoff_skips} = {skip_ratio:.2f} "
        f"(target <= 0.25); final loss ratio {loss_ratio:.4f} (target <= 1; per seed: "
        f"{per_seed})"
    )


# --------------------------------------------------------------------------------------
# Part 2: bfloat16 with compensated updates
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bfloat16Setup:
    steps: int = 1500
    widths: tuple[int, ...] = (64, 256, 256, 16)
    batch: int = 256
    lr: float = 1e-5
    shift: float = 0.05  # the teacher's weights are the student's times (1 + shift * N(0, 1))
    label_noise: float = 5e-3  # the test loss is label_noise**2 + the excess over the teacher
    seed: int = 0


@dataclass
class Bfloat16Result:
    excess_loss: float  # mean squared distance to the teacher's outputs on held-out inputs
    bytes_per_parameter: float
    step_ms: float
    lost_update_fraction: float | None


VARIANTS = ("float32", "plain", "kahan", "stochastic")
VARIANT_LABELS = {
    "float32": "float32 AdamW",
    "plain": "bf16 AdamW (plain)",
    "kahan": 'compensated "kahan"',
    "stochastic": 'compensated "stochastic"',
}


def fine_tuning_task(
    setup: Bfloat16Setup, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(start model in float32, teacher, held-out inputs, the teacher's outputs on them)."""
    widths = list(setup.widths)
    # The start weights are bfloat16 values, so every run starts from the same point.
    start = tanh_mlp(widths, seed=setup.seed).to(torch.bfloat16).float()
    teacher = tanh_mlp(widths, seed=setup.seed).to(torch.bfloat16).float()
    torch.manual_seed(setup.seed + 1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1 + setup.shift * torch.randn_like(p))
    teacher = teacher.to(device)
    data = torch.Generator(device=device).manual_seed(2)
    x_eval = torch.randn(4096, widths[0], device=device, generator=data)
    with torch.no_grad():
        y_eval = teacher(x_eval)
    return start.to(device), teacher, x_eval, y_eval


def tensor_bytes(tensors: Iterable[object]) -> int:
    """Bytes of the distinct tensors among ``tensors`` (non-tensors are skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.data_ptr() if t.numel() else id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def bytes_per_parameter(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """(weights + optimizer state + compensation buffers) / parameters, from the tensors."""
    state = optimizer.state_dict()
    tensors: list[object] = list(model.parameters())
    tensors += [v for per_param in state["state"].values() for v in per_param.values()]
    tensors += list(state.get("compensated", {}).get("compensation", {}).values())
    return tensor_bytes(tensors) / sum(p.numel() for p in model.parameters())


def make_optimizer(
    variant: str, params: list[torch.Tensor], setup: Bfloat16Setup, meter_every: int
) -> torch.optim.Optimizer:
    inner = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
    if variant in ("float32", "plain"):
        return inner
    generator = torch.Generator(device=params[0].device).manual_seed(setup.seed)
    return compensated(inner, variant, generator, meter_every=meter_every)


def train_bfloat16(
    variant: str, setup: Bfloat16Setup, device: torch.device, meter_every: int = 1
) -> Bfloat16Result:
    start, teacher, x_eval, y_eval = fine_tuning_task(setup, device)
    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    model = start.to(dtype)
    optimizer = make_optimizer(variant, list(model.parameters()), setup, meter_every)
    data = torch.Generator(device=device).manual_seed(3)
    step_seconds = []
    for _ in range(setup.steps):
        x = torch.randn(setup.batch, setup.widths[0], device=device, generator=data)
        with torch.no_grad():
            noise = torch.randn(setup.batch, setup.widths[-1], device=device, generator=data)
            y = teacher(x) + setup.label_noise * noise
        loss = (model(x.to(dtype)).float() - y).square().mean()
        loss.backward()
        synchronize(device)
        started = time.perf_counter()
        optimizer.step()
        synchronize(device)
        step_seconds.append(time.perf_counter() - started)
        optimizer.zero_grad()
    lost = None
    if isinstance(optimizer, CompensatedOptimizer) and meter_every:
        lost = optimizer.stats()["lost_update_fraction"]
    return Bfloat16Result(
        excess_loss=held_out_loss(model, x_eval, y_eval),
        bytes_per_parameter=bytes_per_parameter(model, optimizer),
        step_ms=statistics.median(step_seconds[10:]) * 1e3,
        lost_update_fraction=lost,
    )


def report_bfloat16(
    setup: Bfloat16Setup,
    results: dict[str, Bfloat16Result],
    meter_off: dict[str, Bfloat16Result],
    device: torch.device,
) -> None:
    start, teacher, x_eval, y_eval = fine_tuning_task(setup, device)
    noise_loss = setup.label_noise**2
    start_excess = held_out_loss(start, x_eval, y_eval)
    # The teacher itself, rounded to bfloat16: about the least excess a bf16 model reaches.
    floor = held_out_loss(teacher.to(torch.bfloat16), x_eval, y_eval)
    print(
        f"\n## bfloat16: MLP {list(setup.widths)} ({sum(p.numel() for p in start.parameters())} "
        f"parameters), {setup.steps} steps, batch {setup.batch}, AdamW lr {setup.lr:g}\n"
        f"teacher = start weights x (1 + {setup.shift:g} N(0,1)), label noise "
        f"{setup.label_noise:g}: test loss = {noise_loss:.3e} (noise) + excess.\n"
        f"Excess at the start {start_excess:.3e}; of the teacher rounded to bf16 {floor:.3e}"
    )
    fp32 = results["float32"]
    plain = results["plain"]
    fp32_loss = noise_loss + fp32.excess_loss
    print(
        f"{'optimizer':<26}{'test loss':>11}{'vs fp32':>9}{'excess':>11}{'vs fp32':>9}"
        f"{'bytes/param':>12}{'step ms':>9}{'vs plain':>9}{'meter off':>10}{'vs plain':>9}"
        f"{'lost upd.':>10}"
    )
    for variant, r in results.items():
        test_loss = noise_loss + r.excess_loss
        off = meter_off.get(variant)
        off_cols = f"{'-':>10}{'-':>9}"
        if off is not None:
            off_cols = f"{off.step_ms:>10.3f}{off.step_ms / plain.step_ms:>9.2f}"
        lost = "-" if r.lost_update_fraction is None else f"{r.lost_update_fraction:.1%}"
        print(
            f"{VARIANT_LABELS[variant]:<26}{test_loss:>11.4e}{test_loss / fp32_loss:>9.4f}"
            f"{r.excess_loss:>11.3e}{r.excess_loss / fp32.excess_loss:>9.3f}"
            f"{r.bytes_per_parameter:>12.2f}{r.step_ms:>9.3f}{r.step_ms / plain.step_ms:>9.2f}"
            f"{off_cols}{lost:>10}"
        )

    def vs_fp32(variant: str) -> str:
        return f"{(noise_loss + results[variant].excess_loss) / fp32_loss - 1:+.2%}"

    print(
        f"targets: kahan within 1% of fp32 ({vs_fp32('kahan')}), stochastic within 3% "
        f"({vs_fp32('stochastic')}), plain measurably worse ({vs_fp32('plain')})"
    )
    same = all(meter_off[v].excess_loss == results[v].excess_loss for v in meter_off)
    print(f"meter_every=0 trains to the same weights (same final loss): {same}")


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer steps: under a minute")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: steadier timings on a shared machine)",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="float16 runs per scaler (1 with --quick)"
    )
    parser.add_argument("--skip", choices=["float16", "bfloat16"], help="run only the other part")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    fp16 = Float16Setup(steps=1000, growth_interval=20) if args.quick else Float16Setup()
    seeds = 1 if args.quick else args.seeds
    bf16 = Bfloat16Setup(steps=400, widths=(64, 128, 128, 16)) if args.quick else Bfloat16Setup()
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"quick={args.quick}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")

    if args.skip != "float16":
        runs = {
            kind: [train_float16(kind, replace(fp16, seed=seed), device) for seed in range(seeds)]
            for kind in SCALERS
        }
        report_float16(fp16, runs)

    if args.skip != "bfloat16":
        results = {variant: train_bfloat16(variant, bf16, device) for variant in VARIANTS}
        meter_off = {
            variant: train_bfloat16(variant, bf16, device, meter_every=0)
            for variant in ("kahan", "stochastic")
        }
        report_bfloat16(bf16, results, meter_off, device)


if __name__ == "__main__":
    main()
