"""Run the lab: small training runs with one planted numerical fault each, broken and fixed.

For every scenario (default: all, in order), train the broken run and the fixed run
under a finite.Monitor, diagnose both, and print one table row: the fault, how each run
ended (final loss, first step with inf/NaN), the doctor's top finding for the broken
run, the expected finding, and whether they match. Progress goes to standard error.

--out DIR writes the HTML report of each run (DIR/NAME/broken, DIR/NAME/fixed) and an
index.html linking them. --json prints a JSON list with one object per scenario.

Exit status: 0 when every broken run is diagnosed with its expected finding first and
no fixed run has a finding above "info"; 1 otherwise; 2 when a name is unknown.
"""

from __future__ import annotations

import argparse
import html
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from finite.cli._output import console, print_json
from finite.lab import SCENARIOS, LabResult, Outcome, Scenario, run_scenario
from finite.report import write_report

NAME = "lab"
HELP = "run small training runs with planted numerical faults, broken and fixed, and diagnose"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="scenarios to run (default: all; see --list)"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--out", metavar="DIR", help="write each run's HTML report and an index.html to DIR"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.names if name not in SCENARIOS]
    if unknown:
        known = ", ".join(SCENARIOS)
        print(f"finite lab: unknown scenario {', '.join(unknown)}; known: {known}", file=sys.stderr)
        return 2
    scenarios = [SCENARIOS[name] for name in args.names] or list(SCENARIOS.values())
    if args.list:
        _print_list(scenarios, args.json)
        return 0
    results = _run_all(scenarios)
    if args.out is not None:
        _write_reports(results, Path(args.out))
    if args.json:
        print_json([result.record() for result in results])
    else:
        _print_results(results)
    return 0 if all(result.match for result in results) else 1


def _run_all(scenarios: list[Scenario]) -> list[LabResult]:
    results = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("lab", total=len(scenarios))
        for scenario in scenarios:
            progress.update(task, description=scenario.name)
            results.append(run_scenario(scenario))
            progress.advance(task)
    return results


def _print_list(scenarios: list[Scenario], as_json: bool) -> None:
    if as_json:
        print_json(
            [
                {"name": s.name, "fault": s.fault, "fix": s.fix, "expected": s.expected}
                for s in scenarios
            ]
        )
        return
    table = Table(title="Lab scenarios")
    for header in ("scenario", "fault", "fix", "expected finding"):
        table.add_column(header)
    for s in scenarios:
        table.add_row(s.name, escape(s.fault), escape(s.fix), s.expected)
    console().print(table)


def _print_results(results: list[LabResult]) -> None:
    table = Table(title="finite lab")
    for header in ("scenario", "fault", "broken", "fixed", "top finding", "expected", "match"):
        table.add_column(header)
    for r in results:
        table.add_row(
            r.name,
            escape(r.fault),
            _describe(r.broken),
            _describe(r.fixed),
            r.found[0] if r.found else "-",
            r.expected,
            "[green]yes[/green]" if r.match else "[red]no[/red]",
        )
    out = console()
    if not out.is_terminal:
        # A pipe or file has no width: rich would assume 80 columns and squeeze cells.
        natural = out.measure(table, options=out.options.update_width(10_000)).maximum
        out.width = max(out.width, natural)
    out.print(table)
    matched = sum(r.match for r in results)
    style = "green" if matched == len(results) else "red"
    out.print(f"[{style}]{matched} of {len(results)} scenarios diagnosed as planted.[/{style}]")


def _describe(outcome: Outcome) -> str:
    """``loss 0.162`` or ``loss nan, inf/NaN at step 0``, plus the worst severity."""
    loss = outcome.final_loss
    text = f"loss {loss:.3g}" if math.isfinite(loss) else f"loss {loss}"
    if outcome.first_nonfinite_step is not None:
        text += f", inf/NaN at step {outcome.first_nonfinite_step}"
    if not outcome.healthy:
        text += f" ({outcome.worst_severity})"
    return text


def _write_reports(results: list[LabResult], out_dir: Path) -> None:
    rows = []
    for r in results:
        broken = write_report(r.broken_history, r.broken_findings, out_dir / r.name / "broken")
        fixed = write_report(r.fixed_history, r.fixed_findings, out_dir / r.name / "fixed")
        links = (
            f'<a href="{html.escape(broken.relative_to(out_dir).as_posix())}">broken</a> '
            f'<a href="{html.escape(fixed.relative_to(out_dir).as_posix())}">fixed</a>'
        )
        cells = (
            html.escape(r.name),
            html.escape(r.fault),
            html.escape(_describe(r.broken)),
            html.escape(_describe(r.fixed)),
            html.escape(r.found[0] if r.found else "-"),
            html.escape(r.expected),
            "yes" if r.match else "no",
            links,
        )
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    headers = ("scenario", "fault", "broken", "fixed", "top finding", "expected", "match", "")
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>finite lab</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 8px;text-align:left}"
        "</style></head><body><h1>finite lab</h1><table>"
        "<tr>"
        + "".join(f"<th>{h}</th>" for h in headers)
        + "</tr>\n"
        + "\n".join(rows)
        + "</table></body></html>\n"
    )
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    print(f"finite lab: reports written to {out_dir / 'index.html'}", file=sys.stderr)
