"""``print_findings``: findings in the terminal, with rich."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from finite.diagnosis.finding import Finding

__all__ = ["print_findings"]

_STYLES = {"critical": "bold red", "warning": "bold yellow", "info": "bold blue"}


def _panel(finding: Finding) -> Panel:
    style = _STYLES.get(finding.severity, "bold")
    parts: list[Text] = []
    for item in finding.evidence:
        parts.append(Text("  • ") + Text(item.text))
    if finding.cause:
        parts.append(Text.assemble(("Cause: ", "bold"), finding.cause))
    if finding.fix:
        parts.append(Text.assemble(("Fix: ", "bold green"), finding.fix))
    for reference in finding.references:
        parts.append(Text(f"  [{reference}]", style="dim"))
    title = Text.assemble((finding.severity.upper(), style), "  ", (finding.title, "bold"))
    return Panel(
        Group(*parts),
        title=title,
        title_align="left",
        subtitle=Text(finding.code, style="dim"),
        subtitle_align="right",
        border_style=style.split()[-1],
    )


def print_findings(findings: Sequence[Finding], console: Console | None = None) -> None:
    """Print findings as panels: severity and title, evidence, cause, fix, references.

    Parameters
    ----------
    findings : sequence of Finding
        As returned by :func:`finite.diagnose`.
    console : rich.console.Console, optional
        Where to print (default: a new console on standard output).

    Raises
    ------
    TypeError
        If an item is not a :class:`Finding`.
    """
    for finding in findings:
        if not isinstance(finding, Finding):
            raise TypeError(f"findings must hold Finding objects, got {type(finding).__name__}")
    console = console if console is not None else Console()
    if not findings:
        console.print(Text("No numerical problems found.", style="bold green"))
        return
    counts = {s: sum(f.severity == s for f in findings) for s in _STYLES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    console.print(Text(f"{len(findings)} finding(s): {summary}", style="bold"))
    for finding in findings:
        console.print(_panel(finding))
