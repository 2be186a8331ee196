"""Diagnose: a report people can look at, from a history and its findings.

* :func:`write_report`: ``report.html`` (self-contained, plots embedded), ``findings.json``,
  ``history.jsonl`` and one PNG per plot.
* :func:`make_plots` / :class:`Plot`: the plots alone (matplotlib, ``pip install
  'finite[plot]'``).
* :func:`loss_spikes`: which losses the plots mark as spikes.

``docs/report.md`` shows a page and describes every plot.
"""

from finite.report.plots import Plot, make_plots
from finite.report.spikes import loss_spikes
from finite.report.write import FINDING_FIELDS, write_report

__all__ = ["FINDING_FIELDS", "Plot", "loss_spikes", "make_plots", "write_report"]
