"""``report.html``: findings first, each linking to its evidence plot, then the plots.

The page is one self-contained file: plots are embedded as base64 ``data:`` URIs, the
style sheet is inline, there is no script and no address of any other resource, so it
opens offline and cannot leak anything when viewed. Text that came from elsewhere
(findings, module names, references) is HTML-escaped, and web addresses in it lose
their ``http://`` / ``https://`` scheme, so nothing on the page is a link out of it.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from finite._version import __version__
from finite.report.plots import Plot

__all__ = ["render_page"]

_SCHEME = re.compile(r"\b(?:https?|ftp)://", re.IGNORECASE)
_MAX_EVENTS = 20
_MAX_PRECISION_ROWS = 10
_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 62rem;
       padding: 1rem 1.5rem 3rem; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
.summary { color: #555; margin-top: 0; }
.finding { border-left: 5px solid #888; padding: .4rem .9rem; margin: .9rem 0;
           background: #fafafa; }
.finding.critical { border-color: #c62828; } .finding.warning { border-color: #ef8f00; }
.finding.info { border-color: #1565c0; }
.finding h3 { margin: .2rem 0 .4rem; font-size: 1.05rem; }
.badge { display: inline-block; font-size: .75rem; text-transform: uppercase;
         letter-spacing: .04em; padding: .05rem .45rem; border-radius: 3px; color: #fff;
         background: #888; margin-right: .4rem; vertical-align: middle; }
.critical .badge { background: #c62828; } .warning .badge { background: #ef8f00; }
.info .badge { background: #1565c0; }
.code { color: #666; font: .8rem ui-monospace, monospace; margin-left: .4rem; }
.finding ul { margin: .2rem 0 .4rem; padding-left: 1.3rem; }
.meta { color: #666; font-size: .85rem; }
.label { font-weight: 600; }
.plot { margin: 1.2rem 0 2rem; }
.plot img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note, .omitted { color: #666; font-size: .9rem; }
.omitted { font-style: italic; }
table { border-collapse: collapse; font-size: .85rem; }
th, td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f5f5f5; padding: .6rem; white-space: pre-wrap; font-size: .8rem; }
"""


def _text(value: Any) -> str:
    """Escaped text, with web addresses stripped of their scheme (no links out)."""
    return html.escape(_SCHEME.sub("", str(value)))


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return _text(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def render_page(
    *,
    findings: Sequence[Mapping[str, Any]],
    plots: Sequence[Plot],
    summary: Sequence[str] = (),
    events: Sequence[str] = (),
    precision: Any = None,
) -> str:
    """The whole ``report.html`` as a string.

    Parameters
    ----------
    findings : sequence of dict
        ``Finding.to_dict()`` of each finding, in the order to show them.
    plots : sequence of Plot
        The plots, rendered or omitted; each becomes a section with ``id=plot.anchor``.
    summary : sequence of str
        Facts about the run shown under the title (format, steps, ranks).
    events : sequence of str
        Readable non-finite events (``str(event)``).
    precision : PrecisionReport, optional
        Rendered as a verdict and tables (see :func:`_precision_section`).
    """
    anchors = {plot.name: plot.anchor for plot in plots}
    cited: dict[str, list[int]] = {}
    for index, finding in enumerate(findings):
        for item in finding.get("evidence", ()):
            plot = item.get("plot") if isinstance(item, Mapping) else None
            if plot in anchors and index not in cited.setdefault(plot, []):
                cited[plot].append(index)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>finite: numerical health report</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>Numerical health report</h1>",
        f'<p class="summary">{_text(" · ".join(summary))}</p>' if summary else "",
        _findings_section(findings, anchors),
    ]
    if precision is not None:
        parts.append(_precision_section(precision))
    if events:
        parts.append(_events_section(events))
    parts.append(_plots_section(plots, findings, cited))
    parts.append(f'<p class="meta">Written by finite {_text(__version__)}.</p>')
    parts += ["</body>", "</html>", ""]
    return "\n".join(p for p in parts if p)


def _findings_section(findings: Sequence[Mapping[str, Any]], anchors: Mapping[str, str]) -> str:
    out = ['<section id="findings">', "<h2>Findings</h2>"]
    if not findings:
        out.append("<p>No findings.</p>")
    else:
        counts: dict[str, int] = {}
        for finding in findings:
            severity = str(finding.get("severity", ""))
            counts[severity] = counts.get(severity, 0) + 1
        out.append(
            '<p class="summary">'
            + ", ".join(f"{n} {_text(severity)}" for severity, n in counts.items())
            + "</p>"
        )
    for index, finding in enumerate(findings):
        out.append(_finding(index, finding, anchors))
    out.append("</section>")
    return "\n".join(out)


def _finding(index: int, finding: Mapping[str, Any], anchors: Mapping[str, str]) -> str:
    severity = str(finding.get("severity", ""))
    css = severity if severity in ("critical", "warning", "info") else ""
    out = [
        f'<article class="finding {css}" id="finding-{index}">',
        f'<h3><span class="badge">{_text(severity)}</span>{_text(finding.get("title", ""))}'
        f'<span class="code">{_text(finding.get("code", ""))}</span></h3>',
    ]
    evidence = list(finding.get("evidence", ()))
    if evidence:
        out.append('<div class="label">Evidence</div><ul>')
        for item in evidence:
            out.append(f"<li>{_evidence(item, anchors)}</li>")
        out.append("</ul>")
    for key, label in (("cause", "Cause"), ("fix", "Fix")):
        if finding.get(key):
            out.append(f'<p><span class="label">{label}:</span> {_text(finding[key])}</p>')
    references = list(finding.get("references", ()))
    if references:
        out.append('<div class="label">References</div><ul class="meta">')
        out += [f"<li>{_text(reference)}</li>" for reference in references]
        out.append("</ul>")
    out.append("</article>")
    return "\n".join(out)


def _evidence(item: Any, anchors: Mapping[str, str]) -> str:
    if not isinstance(item, Mapping):
        return _text(item)
    text = _text(item.get("text", ""))
    where = []
    if item.get("step") is not None:
        where.append(f"step {_text(item['step'])}")
    if item.get("module"):
        where.append(f"<code>{_text(item['module'])}</code>")
    if where:
        text += f' <span class="meta">({", ".join(where)})</span>'
    plot = item.get("plot")
    if isinstance(plot, str) and plot in anchors:
        text += f' <a href="#{anchors[plot]}">{_text(plot.replace("_", " "))} plot</a>'
    return text


def _plots_section(
    plots: Sequence[Plot], findings: Sequence[Mapping[str, Any]], cited: Mapping[str, list[int]]
) -> str:
    out = ['<section id="plots">', "<h2>Plots</h2>"]
    for plot in plots:
        out.append(f'<section class="plot" id="{plot.anchor}">')
        out.append(f"<h3>{_text(plot.title)}</h3>")
        if plot.png is not None:
            data = base64.b64encode(plot.png).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{_text(plot.title)}">')
            if plot.note:
                out.append(f'<p class="note">{_text(plot.note)}</p>')
        else:
            out.append(f'<p class="omitted">Not plotted: {_text(plot.note)}.</p>')
        if plot.name in cited:
            links = ", ".join(
                f'<a href="#finding-{i}">{_text(findings[i].get("title", ""))}</a>'
                for i in cited[plot.name]
            )
            out.append(f'<p class="note">Evidence for: {links}</p>')
        out.append("</section>")
    out.append("</section>")
    return "\n".join(out)


def _events_section(events: Sequence[str]) -> str:
    shown = "\n\n".join(events[:_MAX_EVENTS])
    more = len(events) - _MAX_EVENTS
    out = [
        '<section id="events">',
        "<h2>Where inf/NaN came from</h2>",
        f"<pre>{_text(shown)}</pre>",
    ]
    if more > 0:
        out.append(f'<p class="note">and {more} more events (all in history.jsonl)</p>')
    out.append("</section>")
    return "\n".join(out)


def _table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = "".join(f"<th>{_text(c).replace('_', ' ')}</th>" for c in columns)
    out = [f"<table><thead><tr>{header}</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            css = ' class="number"' if numeric else ""
            cells.append(f"<td{css}>{_number(value)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def _precision_section(report: Any) -> str:
    """A ``PrecisionReport`` (``finite.compare_precision``): verdict, dtypes, modules.

    Reads the keys of ``report.to_dict()``: ``reference``, ``dtypes``, ``loss``,
    ``loss_error``, ``gradient_error``, ``failed``, ``reference_failed``,
    ``precision_problem``, ``keep_in_float32``, ``errors`` and ``rows`` (the module table,
    worst first within each dtype; the first :data:`_MAX_PRECISION_ROWS` of each dtype
    are shown). Missing keys leave their part out.
    """
    data = report.to_dict()
    reference = str(data.get("reference", "float64"))
    failed = [str(d) for d in data.get("failed", ())]
    out = ['<section id="precision">', "<h2>Precision comparison</h2>"]
    if data.get("precision_problem"):
        verdict = f"A precision problem: fails in {', '.join(failed)}, fine in {reference}."
    elif data.get("reference_failed"):
        verdict = f"Not a precision problem: {reference} fails too (the math, the data or a bug)."
    elif "failed" in data:
        verdict = "No dtype fails on this batch."
    else:
        verdict = ""
    if verdict:
        out.append(f"<p>{_text(verdict)}</p>")
    keep = [m or "<model>" for m in data.get("keep_in_float32", ())]
    if keep:
        out.append(f'<p><span class="label">Keep in float32:</span> {_text(", ".join(keep))}</p>')

    errors = data.get("errors", {})
    dtypes = list(data.get("dtypes", ()))
    if dtypes:
        summary = []
        for dtype in dtypes:
            if dtype in errors:
                status = f"could not run: {errors[dtype]}"
            elif dtype == reference:
                status = "reference" + (" (fails)" if data.get("reference_failed") else "")
            else:
                status = "fails" if dtype in failed else "ok"
            summary.append(
                {
                    "dtype": dtype,
                    "loss": data.get("loss", {}).get(dtype, ""),
                    "loss_error": data.get("loss_error", {}).get(dtype, ""),
                    "gradient_error": data.get("gradient_error", {}).get(dtype, ""),
                    "status": status,
                }
            )
        out += _table(["dtype", "loss", "loss_error", "gradient_error", "status"], summary)

    rows = [row for row in data.get("rows", ()) if isinstance(row, Mapping)]
    if rows:
        shown: list[Mapping[str, Any]] = []
        per_dtype: dict[Any, int] = {}
        for row in rows:
            per_dtype[row.get("dtype")] = per_dtype.get(row.get("dtype"), 0) + 1
            if per_dtype[row.get("dtype")] <= _MAX_PRECISION_ROWS:
                shown.append({**row, "module": row.get("module") or "<model>"})
        out.append(
            '<p class="note">Modules by the relative error they add over their input\'s, '
            "worst first"
            + (
                f" (the first {_MAX_PRECISION_ROWS} of each dtype)"
                if len(shown) < len(rows)
                else ""
            )
            + ".</p>"
        )
        columns = ["dtype", *dict.fromkeys(key for row in shown for key in row if key != "dtype")]
        out += _table(columns, shown)
    out.append("</section>")
    return "\n".join(out)
