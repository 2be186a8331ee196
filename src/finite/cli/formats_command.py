"""Show what each floating-point format can hold, or which tensors in a file survive a cast.

Without --check: the table engineers look up (bits, range, precision, inf/NaN) for
float64 down to fp8. With --check FILE.pt: load a tensor, a list of tensors or a
(nested) state dict with torch.load(weights_only=True) and report, for every
floating-point tensor and every format checked (default fp16, bf16, fp8 e4m3fn and
e5m2), the fraction of elements that would overflow, underflow or turn subnormal, the
rounding error and the headroom. A tensor is flagged when any element overflows, or
when more than --max-underflow of its non-zero elements would round to zero.

Exit status: 0 when no tensor is flagged, 1 when at least one is, 2 when the file
cannot be read or an argument is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

from finite.cli._output import console, print_json
from finite.formats import FORMATS, FloatFormat, cast_report, get_format

NAME = "formats"
HELP = "format table (bits, range, precision); --check FILE.pt: which tensors survive fp16/bf16/fp8"

CHECKED_BY_DEFAULT = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        metavar="FILE",
        help="a .pt file holding a tensor, a list of tensors or a (nested) state dict",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        type=_format_argument,
        metavar="FORMAT",
        help="formats to show or check, by name or alias (fp16, bf16, tf32, e4m3, e5m2, ...); "
        "default: all in the table, fp16 bf16 e4m3 e5m2 with --check",
    )
    parser.add_argument(
        "--max-underflow",
        type=_fraction_argument,
        default=0.01,
        metavar="FRACTION",
        help="with --check, flag a tensor when more than this fraction of its non-zero "
        "elements round to zero (default: 0.01)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    if args.check is None:
        formats = args.formats or list(FORMATS.values())
        if args.json:
            print_json({f.name: f for f in formats})
        else:
            _print_wide(_format_table(formats))
        return 0

    formats = args.formats or [FORMATS[name] for name in CHECKED_BY_DEFAULT]
    try:
        loaded = torch.load(args.check, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises OSError, pickle and zip errors, ...
        print(f"finite formats: cannot read {args.check}: {_load_error(error)}", file=sys.stderr)
        return 2
    checked, skipped = [], []
    for name, tensor in _named_tensors(loaded, prefix=""):
        if tensor.dtype.is_floating_point:
            casts = {fmt.name: _check_cast(tensor, fmt, args.max_underflow) for fmt in formats}
            checked.append(
                {"name": name, "shape": list(tensor.shape), "dtype": tensor.dtype, "casts": casts}
            )
        else:
            skipped.append({"name": name, "dtype": tensor.dtype})
    if args.json:
        print_json(
            {
                "file": args.check,
                "formats": [f.name for f in formats],
                "max_underflow": args.max_underflow,
                "tensors": checked,
                "skipped": skipped,
            }
        )
    else:
        _print_check(args.check, formats, checked, skipped)
    survives = all(cast["survives"] for entry in checked for cast in entry["casts"].values())
    return 0 if survives else 1


def _format_argument(text: str) -> FloatFormat:
    try:
        return get_format(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fraction_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _load_error(error: Exception) -> str:
    """The useful part of a ``torch.load`` error (its weights-only messages run to paragraphs)."""
    text = str(error).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", text)
    if unpickler:
        return (
            "not a file that torch.load(weights_only=True) accepts, which loads only tensors "
            f"and plain containers ({unpickler.group(1)})"
        )
    return text.splitlines()[0] if text else type(error).__name__


def _named_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside ``obj`` (dicts and lists, nested), named by its key path."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<tensor>", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def _check_cast(tensor: torch.Tensor, fmt: FloatFormat, max_underflow: float) -> dict[str, Any]:
    """``cast_report``'s fields, plus the verdict: ``survives`` and the ``problems`` found."""
    report = cast_report(tensor, fmt)
    problems = []
    if report.overflow > 0:
        problems.append("overflow")
    if report.underflow > max_underflow:
        problems.append("underflow")
    return {**dataclasses.asdict(report), "survives": not problems, "problems": problems}


def _print_wide(table: Table) -> None:
    """Print ``table`` whole: on a terminal within its width, in a pipe at full width."""
    out = console()
    if not out.is_terminal:
        # A pipe or file has no width: rich would assume 80 columns and squeeze cells.
        natural = out.measure(table, options=out.options.update_width(10_000)).maximum
        out.width = max(out.width, natural)
    out.print(table)


def _format_table(formats: Sequence[FloatFormat]) -> Table:
    table = Table(title="Floating-point formats")
    for header in (
        "format",
        "torch dtype",
        "bits",
        "exponent\nbits",
        "mantissa\nbits",
        "max",
        "smallest\nnormal",
        "smallest\nsubnormal",
        "eps",
        "decimal\ndigits",
        "inf",
        "nan",
    ):
        table.add_column(header, justify="left" if header in ("format", "torch dtype") else "right")
    for f in formats:
        table.add_row(
            f.name,
            str(f.torch_dtype) if f.torch_dtype is not None else "-",
            str(f.bits),
            str(f.exponent_bits),
            str(f.mantissa_bits),
            f"{f.max:.6g}",
            _power_of_two(f.min_normal),
            _power_of_two(f.min_subnormal),
            _power_of_two(f.eps),
            f"{f.decimal_digits:.2f}",
            "yes" if f.has_inf else "no",
            "yes" if f.has_nan else "no",
        )
    return table


def _power_of_two(value: float) -> str:
    exponent = math.frexp(value)[1] - 1
    return f"2^{exponent} ({value:.3g})"


def _print_check(
    path: str, formats: Sequence[FloatFormat], checked: list[dict], skipped: list[dict]
) -> None:
    out = console()
    if not checked:
        out.print(f"No floating-point tensors in {escape(path)}.")
    for fmt in formats:
        if checked:
            _print_wide(_check_table(f"{escape(path)}: cast to {fmt.name}", fmt.name, checked))
            failing = [
                f"{escape(entry['name'])} ({', '.join(entry['casts'][fmt.name]['problems'])})"
                for entry in checked
                if not entry["casts"][fmt.name]["survives"]
            ]
            if failing:
                message = f"[red]{len(failing)} of {len(checked)} tensors would not survive"
                out.print(f"{message} {fmt.name}:[/red] {'; '.join(failing)}", soft_wrap=True)
            else:
                out.print(f"[green]All {len(checked)} tensors survive {fmt.name}.[/green]")
    nonfinite = [
        escape(entry["name"])
        for entry in checked
        if any(cast["already_nonfinite"] > 0 for cast in entry["casts"].values())
    ]
    if nonfinite:
        out.print(
            f"[yellow]Already inf or NaN before any cast:[/yellow] {', '.join(nonfinite)}",
            soft_wrap=True,
        )
    if skipped:
        names = ", ".join(f"{escape(s['name'])} ({_dtype_name(s['dtype'])})" for s in skipped)
        out.print(f"Skipped {len(skipped)} non-floating tensors: {names}", soft_wrap=True)


def _check_table(title: str, fmt_name: str, checked: list[dict]) -> Table:
    table = Table(title=title)
    for header in (
        "tensor",
        "shape",
        "dtype",
        "overflow",
        "underflow",
        "subnormal",
        "max rel\nerror",
        "mean rel\nerror",
        "headroom\nbits",
        "non-finite\nalready",
        "verdict",
    ):
        table.add_column(header, justify="left" if header in ("tensor", "dtype") else "right")
    for entry in checked:
        cast = entry["casts"][fmt_name]
        table.add_row(
            escape(entry["name"]),
            "x".join(map(str, entry["shape"])) or "scalar",
            _dtype_name(entry["dtype"]),
            _percent(cast["overflow"]),
            _percent(cast["underflow"]),
            _percent(cast["subnormal"]),
            _scientific(cast["max_rel_error"]),
            _scientific(cast["mean_rel_error"]),
            f"{cast['headroom_bits']:+.1f}",
            _percent(cast["already_nonfinite"]),
            _verdict(cast),
        )
    return table


def _verdict(cast: dict[str, Any]) -> str:
    return "[green]ok[/green]" if cast["survives"] else f"[red]{', '.join(cast['problems'])}[/red]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _percent(fraction: float) -> str:
    return "0" if fraction == 0 else f"{100 * fraction:.3g}%"


def _scientific(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"
