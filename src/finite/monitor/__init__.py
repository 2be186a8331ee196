"""Detect: watch a model's numerics while it trains, and find where inf/NaN come from.

* :class:`Monitor`: per-layer activation, gradient and update statistics every step,
  accumulated on the device and read every ``sync_every`` steps into a :class:`History`;
  :class:`NonfiniteEvent` s naming the module where inf/NaN first appeared.
* :func:`locate`: re-run one step and name the aten op, module and source line.

``docs/monitor.md`` describes every statistic and the guarantees.
"""

from finite.monitor.events import NonfiniteEvent, TensorSummary
from finite.monitor.histograms import HistogramBins, log2_histogram
from finite.monitor.history import History, Table
from finite.monitor.locate import OpLocation, locate
from finite.monitor.monitor import Monitor

__all__ = [
    "HistogramBins",
    "History",
    "Monitor",
    "NonfiniteEvent",
    "OpLocation",
    "Table",
    "TensorSummary",
    "locate",
    "log2_histogram",
]
