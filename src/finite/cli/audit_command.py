"""Measure the accuracy of finite's ops against PyTorch's and the textbook formulas.

For each op and dtype (float64, float32, bfloat16, float16), seeded inputs covering the
op's hard cases are rounded to the dtype, and the values and gradients of three
implementations are compared with a reference computed on the exact rounded inputs
(mpmath at 50 digits; exact rationals for sums and variances):

  finite  finite.ops
  torch   PyTorch's nearest equivalent (- where there is none)
  naive   the textbook formula in the input dtype, e.g. log(sum(exp(x)))

Each cell gives the largest error and the 99th percentile in ULPs of the dtype
(0.5 = correctly rounded; near zero, ULPs of the smallest subnormal), and the number
of inf/NaN results where the exact result is finite. finite's cells are red and marked
* where it misses its target (float64/float32: 2 ULP forward, 4 gradient;
bfloat16/float16: 1 ULP); a torch or naive cell is yellow where it is worse than
finite's. A second table checks the specified edge cases (all -inf slices, fully
masked rows, ...).

Exit status: 0 when finite meets every target and edge case, 1 otherwise, 2 for a
wrong argument.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch
from rich.table import Table

from finite.audit import (
    CASES,
    DEFAULT_SAMPLES,
    DTYPES,
    AuditRow,
    ErrorStats,
    SpecialResult,
    is_documented_exception,
    meets_target,
    run_audit,
    run_special_cases,
    target_ulp,
)
from finite.cli._output import console, print_json
from finite.formats import get_format

NAME = "audit"
HELP = "accuracy of finite's ops vs PyTorch and the naive formulas, in ULPs (mpmath reference)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ops",
        nargs="+",
        type=_op_argument,
        metavar="OP",
        help=f"ops to audit (default: all): {', '.join(CASES)}",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        type=_dtype_argument,
        metavar="DTYPE",
        help="dtypes to audit, by name or alias (default: float64 float32 bfloat16 float16)",
    )
    parser.add_argument(
        "--samples",
        type=_positive_int,
        default=DEFAULT_SAMPLES,
        metavar="N",
        help=f"approximate number of input elements per op and dtype (default: {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the input generators (default: 0)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rows = run_audit(args.ops, args.dtypes, samples=args.samples, seed=args.seed)
    specials = run_special_cases(args.ops, args.dtypes)
    seconds = time.perf_counter() - start
    passed = all(_meets(row, row.finite) for row in rows) and all(s.finite for s in specials)
    if args.json:
        print_json(
            {
                "samples": args.samples,
                "seed": args.seed,
                "seconds": round(seconds, 2),
                "torch_version": torch.__version__,
                "meets_targets": passed,
                "rows": rows,
                "special_cases": specials,
            }
        )
    else:
        out = console()
        _print_wide(_accuracy_table(rows))
        if specials:
            _print_wide(_special_table(specials))
        verdict = (
            "[green]finite meets every target.[/green]"
            if passed
            else "[red]finite misses a target (cells marked *).[/red]"
        )
        if any(is_documented_exception(r.op, r.dtype, r.quantity) for r in rows):
            verdict += (
                " Cells marked \N{DAGGER} are float64 cancellations held to ULPs of the"
                " terms, not of the result (docs/accuracy.md)."
            )
        out.print(
            f"{verdict} {len(rows)} rows, {args.samples} samples per op and dtype, "
            f"seed {args.seed}, {seconds:.1f} s.",
            soft_wrap=True,
        )
    return 0 if passed else 1


def _op_argument(text: str) -> str:
    if text not in CASES:
        raise argparse.ArgumentTypeError(f"unknown op {text!r}; audited ops: {', '.join(CASES)}")
    return text


def _dtype_argument(text: str) -> torch.dtype:
    audited = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
    try:
        dtype = get_format(text).torch_dtype
    except ValueError:
        dtype = None
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype {text!r} is not audited; choose from {audited}")
    return dtype


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _meets(row: AuditRow, stats: ErrorStats) -> bool:
    return meets_target(stats.max_ulp, stats.nonfinite, row.dtype, row.quantity, row.op)


def _print_wide(table: Table) -> None:
    """Print ``table`` whole: on a terminal within its width, in a pipe at full width."""
    out = console()
    if not out.is_terminal:
        # A pipe or file has no width: rich would assume 80 columns and squeeze cells.
        natural = out.measure(table, options=out.options.update_width(10_000)).maximum
        out.width = max(out.width, natural)
    out.print(table)


def _accuracy_table(rows: Sequence[AuditRow]) -> Table:
    table = Table(title="Accuracy in ULPs vs an mpmath reference (max / p99 / non-finite)")
    for header in ("op", "dtype", "quantity"):
        table.add_column(header)
    for column in ("finite", "torch", "naive"):
        table.add_column(f"{column}\nmax", justify="right")
        table.add_column(f"{column}\np99", justify="right")
        table.add_column(f"{column}\nnon-fin", justify="right")
    previous_op = None
    for row in rows:
        cells = [row.op if row.op != previous_op else "", row.dtype, row.quantity]
        cells.extend(_finite_cells(row))
        for other in (row.torch, row.naive):
            worse = other is not None and _worse(other, row.finite)
            cells.extend(_stats_cells(other, "yellow" if worse else ""))
        table.add_row(*cells, end_section=row.quantity == "gradient" and row.dtype == "float16")
        previous_op = row.op
    return table


def _worse(other: ErrorStats, finite: ErrorStats) -> bool:
    return other.nonfinite > finite.nonfinite or other.max_ulp > finite.max_ulp


def _finite_cells(row: AuditRow) -> list[str]:
    """finite's cells, the max and non-finite count red and marked * where they miss the
    target (the mark survives where colour does not: a pipe, a file, the docs)."""
    stats = row.finite
    max_cell, p99_cell, nonfinite_cell = _stats_cells(stats, "")
    if is_documented_exception(row.op, row.dtype, row.quantity):
        max_cell = f"{max_cell}\N{DAGGER}"
    elif stats.max_ulp > target_ulp(row.dtype, row.quantity):
        max_cell = f"[red]{max_cell}*[/red]"
    if stats.nonfinite > 0:
        nonfinite_cell = f"[red]{nonfinite_cell}*[/red]"
    return [max_cell, p99_cell, nonfinite_cell]


def _stats_cells(stats: ErrorStats | None, style: str) -> list[str]:
    if stats is None:
        return ["-", "-", "-"]
    cells = [_ulps(stats.max_ulp), _ulps(stats.p99_ulp), str(stats.nonfinite)]
    return [f"[{style}]{c}[/{style}]" for c in cells] if style else cells


def _ulps(value: float) -> str:
    if math.isinf(value):
        return "inf"
    if value == 0:
        return "0"
    if value < 100:
        return f"{value:.3g}"
    return f"{value:.2g}" if value >= 1e4 else f"{value:.0f}"


def _special_table(results: Sequence[SpecialResult]) -> Table:
    table = Table(title="Specified edge cases (values and gradients, every dtype)")
    for header in ("op", "edge case", "finite", "torch"):
        table.add_column(header)
    grouped: dict[tuple[str, str], list[SpecialResult]] = {}
    for result in results:
        grouped.setdefault((result.op, result.description), []).append(result)
    for (op, description), group in grouped.items():
        table.add_row(
            op,
            description,
            _verdict([r.finite for r in group], group),
            _verdict([r.torch for r in group], group),
        )
    return table


def _verdict(passes: Sequence[bool | None], group: Sequence[SpecialResult]) -> str:
    if passes[0] is None:
        return "-"
    failing = [r.dtype for r, ok in zip(group, passes, strict=True) if not ok]
    if not failing:
        return "[green]ok[/green]"
    if len(failing) == len(group):
        return "[red]fails[/red]"
    return f"[red]fails in {', '.join(failing)}[/red]"
