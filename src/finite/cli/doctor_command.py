"""Diagnose a training script with no change to it: ``finite doctor train.py ARGS...``.

Runs SCRIPT in this process as ``__main__`` (``sys.argv`` = SCRIPT ARGS, the script's
folder first on ``sys.path``) with global hooks that attach a finite.Monitor to every
model the script trains (a module with parameters called while no other module runs),
with the optimizer that holds its parameters; the loss is taken where ``backward()`` is
called on a one-element tensor. When the script ends, however it ends, the findings are
printed and the report (report.html, findings.json, history.jsonl) is written to --out
(one subfolder per model when there are several). Under torchrun every rank records and
rank 0 prints and writes the report of all ranks (finite.doctor.distributed).

With no SCRIPT it runs the built-in example: float16 training without loss scaling
(the lab's fp16-underflow scenario), then with the fix, and prints both diagnoses.

Exit status: the script's own (0 when it finished or --max-steps stopped it, the code of
sys.exit, 1 for an uncaught exception after its traceback, 130 for Ctrl-C); 2 when
SCRIPT does not exist. The example exits 0 when the doctor names the planted fault and
finds nothing above "info" in the fixed run, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from finite.cli._output import console
from finite.diagnosis import Finding, print_findings

if TYPE_CHECKING:
    from finite.doctor import ModelReport, RunResult
    from finite.lab import Outcome

NAME = "doctor"
HELP = "run a training script with no change to it and diagnose its numerics"

SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", metavar="DIR", default="finite-report", help="report folder (default: %(default)s)"
    )
    parser.add_argument(
        "--precision",
        metavar="FORMAT",
        help="format to measure against (float16, bfloat16, ...; default: the model's)",
    )
    parser.add_argument(
        "--sync-every",
        type=_positive,
        default=10,
        metavar="N",
        help="steps between reads of the statistics (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps", type=_positive, metavar="N", help="stop the script after N optimizer steps"
    )
    parser.add_argument(
        "--raise-on-nonfinite",
        action="store_true",
        help="raise FloatingPointError at the first step with inf/NaN, before the weights change",
    )
    parser.add_argument(
        "--no-html", action="store_true", help="write findings.json and history.jsonl only"
    )
    parser.add_argument("script", nargs="?", metavar="SCRIPT", help="the training script")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script"
    )


def run(args: argparse.Namespace) -> int:
    if args.script is None:
        return _run_example(args)
    from finite.doctor import run_script

    if not Path(args.script).is_file():
        print(f"finite doctor: no such script: {args.script}", file=sys.stderr)
        return 2
    if args.precision is not None:
        from finite.formats import get_format

        try:
            get_format(args.precision)
        except (TypeError, ValueError) as exc:
            print(f"finite doctor: --precision: {exc}", file=sys.stderr)
            return 2
    monitor_kwargs = {
        "precision": args.precision,
        "sync_every": args.sync_every,
        "on_nonfinite": "raise" if args.raise_on_nonfinite else "record",
    }
    result = run_script(
        args.script, list(args.args), monitor_kwargs=monitor_kwargs, max_steps=args.max_steps
    )
    from finite.doctor import distributed

    rank, world_size = distributed.world()
    if world_size > 1:
        return _report_ranks(args, result, rank, world_size)
    _report(args, result, result.reports, Path(args.out))
    return result.exit_status


def _report(
    args: argparse.Namespace, result: RunResult, reports: list[ModelReport], out_dir: Path
) -> None:
    """Print the findings of ``reports`` and write them under ``out_dir``."""
    from finite.doctor import write_reports

    out = console()
    if result.ended == "max-steps":
        print(f"finite doctor: stopped after {result.optimizer_steps} steps", file=sys.stderr)
    if not reports:
        print(
            "finite doctor: no model was trained (no module with parameters ran with "
            "gradients enabled); nothing to diagnose",
            file=sys.stderr,
        )
        return
    for report in reports:
        if len(reports) > 1:
            out.rule(report.name)
        print_findings(report.findings, console=out)
    dirs = write_reports(reports, out_dir, html=not args.no_html)
    for directory in dirs:
        name = "findings.json" if args.no_html else "report.html"
        print(f"finite doctor: report written to {directory / name}", file=sys.stderr)


def _report_ranks(args: argparse.Namespace, result: RunResult, rank: int, world_size: int) -> int:
    """Distributed: rank 0 prints and writes the report of every rank; the others send
    theirs to it (see finite.doctor.distributed) and print nothing."""
    from finite.doctor import distributed, write_reports

    out_dir = Path(args.out)
    try:
        gathered = distributed.gather_reports(
            result.reports, rank=rank, world_size=world_size, status=result.exit_status
        )
    except distributed.NoStore:
        gathered = False  # no way to reach rank 0: every rank writes its own report
    if isinstance(gathered, distributed.Gathered):
        try:
            if gathered.missing:
                missing = ", ".join(str(r) for r in gathered.missing)
                print(
                    f"finite doctor: no results from rank(s) {missing} within "
                    f"{distributed.GATHER_TIMEOUT_S:g} s; the report has the other ranks",
                    file=sys.stderr,
                )
            _report(args, result, gathered.reports, out_dir)
        finally:
            gathered.release()
        return result.exit_status
    if gathered is True:
        return result.exit_status  # rank 0 wrote this rank's results
    own = out_dir / f"rank{rank}"
    if rank == 0:
        _report(args, result, result.reports, own)
    elif result.reports:
        write_reports(result.reports, own, html=not args.no_html)
    return result.exit_status


def _run_example(args: argparse.Namespace) -> int:
    from finite.doctor import EXAMPLE, run_example, write_reports
    from finite.doctor.session import ModelReport

    print(
        f"finite doctor: no script given; running the built-in example ({EXAMPLE})", file=sys.stderr
    )
    result = run_example()
    out = console()
    table = Table(title=f"finite doctor: {result.name}")
    table.add_column(f"broken: {result.fault}")
    table.add_column(f"fixed: {result.fix}")
    table.add_row(_losses(result.broken), _losses(result.fixed))
    table.add_row(_summary(result.broken_findings), _summary(result.fixed_findings))
    out.print(table)
    out.rule("broken run")
    print_findings(result.broken_findings, console=out)
    reports = [
        ModelReport("broken", result.broken_history, list(result.broken_findings)),
        ModelReport("fixed", result.fixed_history, list(result.fixed_findings)),
    ]
    out_dir = Path(args.out)
    for report in reports:
        write_reports([report], out_dir / report.name, html=not args.no_html)
    print(
        f"finite doctor: reports written to {out_dir}/broken and {out_dir}/fixed", file=sys.stderr
    )
    return 0 if result.match else 1


def _losses(outcome: Outcome) -> str:
    return f"loss {outcome.first_loss:.3g} -> {outcome.final_loss:.3g} in {outcome.steps} steps"


def _summary(findings: tuple[Finding, ...]) -> str:
    if not findings:
        return "no numerical problems found"
    return "\n".join(f"{f.severity}: {f.code}\n  {f.title}" for f in findings)
