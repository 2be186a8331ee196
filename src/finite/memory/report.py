"""Tables for people: activation reports and checkpoint plans rendered with rich.

The data lives in :mod:`finite.memory.activations` and :mod:`finite.memory.planner`; this
module only turns it into :class:`rich.table.Table` objects.
"""

from __future__ import annotations

import math

from rich.table import Table

from finite.memory.activations import ActivationReport
from finite.memory.planner import CheckpointPlan

__all__ = ["activation_table", "format_bytes", "plan_table"]


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, three significant digits."""
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    exponent = min(int(math.log(nbytes, 1024)), 4)
    unit = ("B", "KiB", "MiB", "GiB", "TiB")[exponent]
    return f"{nbytes / 1024**exponent:.3g} {unit}"


def activation_table(report: ActivationReport, top: int | None = None) -> Table:
    """The modules of ``report`` by saved bytes, largest first, with a total row.

    Parameters
    ----------
    report : ActivationReport
        What :func:`~finite.memory.activation_memory` returned.
    top : int, optional
        Show only the ``top`` largest modules (the total still counts all of them).
    """
    table = Table(title="Activation memory saved for backward")
    table.add_column("module")
    table.add_column("type")
    table.add_column("saved", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    rows = sorted(report.by_module.items(), key=lambda item: (-item[1], item[0]))
    if top is not None:
        rows = rows[:top]
    total = report.total_bytes
    for path, nbytes in rows:
        share = nbytes / total if total else 0.0
        table.add_row(
            path or "(model)",
            report.module_types.get(path, ""),
            format_bytes(nbytes),
            str(nbytes),
            f"{share:.1%}",
        )
    table.add_section()
    table.add_row("total", "", format_bytes(total), str(total), "100.0%" if total else "")
    if report.parameter_bytes:
        table.add_row("parameters (not counted)", "", format_bytes(report.parameter_bytes), "", "")
    if report.device_allocated_bytes is not None:
        table.add_row(
            "CUDA allocated during forward",
            "",
            format_bytes(report.device_allocated_bytes),
            str(report.device_allocated_bytes),
            "",
        )
    return table


def plan_table(plan: CheckpointPlan) -> Table:
    """Every candidate of ``plan`` with its measured saving and forward time.

    A chosen segment (``"blocks[2:5]"``) gets its own row, and each block inside it says
    which segment recomputes it.
    """
    table = Table(title=f"Checkpoint plan ({plan.method}) for {format_bytes(plan.budget_bytes)}")
    table.add_column("candidate")
    table.add_column("saves", justify="right")
    table.add_column("forward ms", justify="right")
    table.add_column("recompute", justify="center")
    chosen = set(plan.chosen)
    segments = {cost.path: cost for cost in plan.chosen_costs if "[" in cost.path}
    for candidate in plan.candidates:
        within = [name for name in segments if _in_segment(candidate.path, name)]
        table.add_row(
            candidate.path,
            format_bytes(max(candidate.saved_bytes, 0)),
            f"{candidate.forward_seconds * 1e3:.3f}",
            "yes" if candidate.path in chosen else (f"in {within[0]}" if within else ""),
        )
    for name, cost in segments.items():
        table.add_row(
            name, format_bytes(max(cost.saved_bytes, 0)), f"{cost.forward_seconds * 1e3:.3f}", "yes"
        )
    table.add_section()
    table.add_row("without checkpointing", format_bytes(plan.baseline_bytes), "", "")
    table.add_row("predicted", format_bytes(plan.predicted_bytes), "", "")
    table.add_row("measured", format_bytes(plan.measured_bytes), "", "")
    table.add_row("+ largest recomputation", format_bytes(plan.recompute_bytes), "", "")
    table.add_row(
        "peak (within budget)" if plan.fits else "peak (OVER budget)",
        format_bytes(plan.peak_bytes),
        "",
        "",
    )
    return table


def _in_segment(path: str, segment: str) -> bool:
    """Whether module ``path`` is one of the blocks of ``segment`` (``"parent[i:j]"``)."""
    parent, _, bounds = segment[:-1].rpartition("[")
    start, stop = (int(b) for b in bounds.split(":"))
    prefix = f"{parent}." if parent else ""
    if not path.startswith(prefix):
        return False
    index = path[len(prefix) :].split(".", 1)[0]
    return index.isdigit() and start <= int(index) < stop
