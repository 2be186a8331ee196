"""What the monitor measured, step by step: a columnar record with numpy columns.

A :class:`History` holds four :class:`Table` s (one row per step; per step and module;
per step and parameter; per step, parameter and tensor for histograms) and the
:class:`~finite.monitor.NonfiniteEvent` s. It is written to and read back from a JSON
Lines file (``history.jsonl``), one line per step, so that a finished or crashed run can
be examined later with :meth:`History.from_jsonl`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from finite.monitor.events import NonfiniteEvent
from finite.monitor.histograms import HistogramBins

__all__ = ["JSONL_VERSION", "History", "Table"]

#: Version of the ``history.jsonl`` layout written by this module.
JSONL_VERSION = 1

_INT, _FLOAT, _BOOL, _STR = np.int64, np.float64, np.bool_, object

#: Columns of :attr:`History.steps`, one row per step.
STEP_COLUMNS: dict[str, Any] = {
    "step": _INT,
    "rank": _INT,
    "loss": _FLOAT,
    "loss_scale": _FLOAT,
    "skipped": _BOOL,
    "measured": _BOOL,
    "grad_norm": _FLOAT,
    "nonfinite_grads": _INT,
}
#: Columns of :attr:`History.modules`, one row per measured step and leaf module.
MODULE_COLUMNS: dict[str, Any] = {
    "step": _INT,
    "rank": _INT,
    "module": _STR,
    "type": _STR,
    "calls": _INT,
    "numel": _INT,
    "absmax": _FLOAT,
    "rms": _FLOAT,
    "nonfinite": _INT,
    "headroom_bits": _FLOAT,
    "dead_fraction": _FLOAT,
    "saturated_fraction": _FLOAT,
}
#: Columns of :attr:`History.params`, one row per measured step and parameter.
PARAM_COLUMNS: dict[str, Any] = {
    "step": _INT,
    "rank": _INT,
    "param": _STR,
    "numel": _INT,
    "grad_norm": _FLOAT,
    "grad_absmax": _FLOAT,
    "grad_nonfinite": _INT,
    "grad_underflow_fraction": _FLOAT,
    "grad_subnormal_fraction": _FLOAT,
    "weight_norm": _FLOAT,
    "update_norm": _FLOAT,
    "update_ratio": _FLOAT,
}
#: Columns of :attr:`History.histograms`; ``counts`` is 2-d (rows, bins).
HISTOGRAM_COLUMNS: dict[str, Any] = {
    "step": _INT,
    "rank": _INT,
    "param": _STR,
    "tensor": _STR,
    "counts": _INT,
}
_TABLES = {
    "steps": STEP_COLUMNS,
    "modules": MODULE_COLUMNS,
    "params": PARAM_COLUMNS,
    "histograms": HISTOGRAM_COLUMNS,
}


class Table:
    """Equal-length numpy columns, by name.

    ``table["grad_norm"]`` is a column, ``len(table)`` the number of rows and
    ``table.where(param="fc.weight")`` the rows whose columns equal the given values.
    String columns have dtype ``object``; ``counts`` (histograms) is 2-d.
    """

    def __init__(self, columns: Mapping[str, np.ndarray]) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns have different lengths: {sorted(lengths)}")
        self._columns = dict(columns)
        self._rows = lengths.pop() if lengths else 0

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._columns)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._columns:
            raise KeyError(f"no column {name!r}; columns: {', '.join(self._columns)}")
        return self._columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self._columns

    def __len__(self) -> int:
        return self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def where(self, **equals: Any) -> Table:
        """The rows where every named column equals the given value."""
        mask = np.ones(self._rows, dtype=bool)
        for name, value in equals.items():
            mask &= self[name] == value
        return Table({k: v[mask] for k, v in self._columns.items()})

    def to_dict(self) -> dict[str, list]:
        return {k: v.tolist() for k, v in self._columns.items()}

    def __repr__(self) -> str:
        return f"Table({self._rows} rows; {', '.join(self._columns)})"


class _Columns:
    """Columns appended to in chunks, concatenated on first read."""

    def __init__(self, spec: Mapping[str, Any], nbins: int = 0) -> None:
        self._spec = spec
        self._nbins = nbins
        self._chunks: dict[str, list[np.ndarray]] = {name: [] for name in spec}
        self._table: Table | None = None

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        for name, dtype in self._spec.items():
            values = [row.get(name) for row in rows]
            array: np.ndarray
            if name == "counts":
                array = np.asarray(values, dtype=dtype).reshape(len(values), -1)
            elif dtype is _STR:
                array = np.empty(len(values), dtype=object)
                array[:] = values
            elif dtype is _FLOAT:
                array = np.asarray([math.nan if v is None else v for v in values], dtype=dtype)
            elif dtype is _INT:  # -1: not available
                array = np.asarray([-1 if v is None else v for v in values], dtype=dtype)
            else:
                array = np.asarray([bool(v) for v in values], dtype=dtype)
            self._chunks[name].append(array)
        self._table = None

    def table(self) -> Table:
        if self._table is None:
            columns = {}
            for name, dtype in self._spec.items():
                chunks = self._chunks[name]
                if not chunks:
                    shape = (0, self._nbins) if name == "counts" else (0,)
                    columns[name] = np.empty(shape, dtype=dtype)
                    continue
                if len(chunks) > 1:
                    chunks[:] = [np.concatenate(chunks)]
                columns[name] = chunks[0]
            self._table = Table(columns)
        return self._table


class History:
    """Columnar record of a monitored run.

    Tables (numpy columns; ``step`` and ``rank`` in each):

    * :attr:`steps`: one row per step. ``loss`` (as passed to ``monitor.step``; NaN if
      none), ``loss_scale`` (of the ``scaler``; NaN without one), ``skipped`` (the scaler
      skipped the optimizer step), ``measured`` (statistics were taken: every ``every``
      steps), ``grad_norm`` (global L2 norm of all parameter gradients, divided by the loss
      scale; NaN when no backward ran), ``nonfinite_grads`` (parameters whose gradient held
      inf/NaN; -1 when no backward ran).
    * :attr:`modules`: per measured step and leaf module. ``calls`` (forward calls in the
      step), ``numel`` (output elements over all calls), ``absmax`` (largest ``|y|``; NaN
      if a NaN occurred), ``rms`` (``sqrt(mean(y**2))``), ``nonfinite`` (inf/NaN count),
      ``headroom_bits`` (``log2(format.max / absmax)``: doublings left before the output
      overflows the format; negative when it already does, ``inf`` for all-zero output),
      ``dead_fraction`` (ReLU/ReLU6: units zero for the whole batch, per call, averaged
      over calls; NaN for other modules), ``saturated_fraction`` (Sigmoid/Tanh: outputs
      whose local derivative is below 1% of its maximum; NaN for other modules).
    * :attr:`params`: per measured step and parameter (named as in
      ``model.named_parameters()``). Gradient columns (NaN/-1 when the parameter had no
      gradient): ``grad_norm`` and ``grad_absmax`` of the true gradient (divided by the
      loss scale), ``grad_nonfinite``, ``grad_underflow_fraction`` (finite non-zero
      elements that round to 0 in the format, measured on the gradient as stored, i.e.
      scaled), ``grad_subnormal_fraction`` (those that round to a subnormal). Update
      columns (NaN when no optimizer step ran): ``weight_norm`` (before the step),
      ``update_norm`` (``|w_after - w_before|``), ``update_ratio``
      (``update_norm / |w_before|``; NaN when ``w_before`` is zero).
    * :attr:`histograms`: every ``histograms_every`` measured steps, per parameter and
      ``tensor`` (``"weight"`` or ``"grad"``): ``counts``, a ``(rows, bins.nbins)`` array
      of log2-magnitude histograms laid out as :class:`~finite.monitor.HistogramBins`
      describes.

    :attr:`format` is the format the statistics are measured against, :attr:`bins` the
    histogram binning and :attr:`events` the non-finite events.
    """

    def __init__(self, format: str | None = None, bins: HistogramBins | None = None) -> None:
        self.format = format
        self.bins = bins
        self.events: list[NonfiniteEvent] = []
        nbins = bins.nbins if bins is not None else 0
        self._columns = {name: _Columns(spec, nbins) for name, spec in _TABLES.items()}

    # ------------------------------------------------------------------ tables
    @property
    def steps(self) -> Table:
        return self._columns["steps"].table()

    @property
    def modules(self) -> Table:
        return self._columns["modules"].table()

    @property
    def params(self) -> Table:
        return self._columns["params"].table()

    @property
    def histograms(self) -> Table:
        return self._columns["histograms"].table()

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return (
            f"History(format={self.format!r}, steps={len(self.steps)}, "
            f"modules={len(self.modules)}, params={len(self.params)}, events={len(self.events)})"
        )

    def series(self, column: str, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one column.

        Without ``name``, a column of :attr:`steps`; with ``name``, a column of
        :attr:`params` (for a parameter name) or :attr:`modules` (for a module path).
        """
        if name is None:
            table = self.steps
            return table["step"], table[column]
        for table, key in ((self.params, "param"), (self.modules, "module")):
            if column in table and (table[key] == name).any():
                rows = table.where(**{key: name})
                return rows["step"], rows[column]
        raise KeyError(f"no parameter or module {name!r} with a column {column!r}")

    # ------------------------------------------------------------------ building
    def extend(
        self, records: Iterable[Mapping[str, Any]], events: Iterable[NonfiniteEvent] = ()
    ) -> None:
        """Append step records (the dicts of a ``history.jsonl`` file) and events."""
        steps: list[dict[str, Any]] = []
        modules: list[dict[str, Any]] = []
        params: list[dict[str, Any]] = []
        histograms: list[dict[str, Any]] = []
        for record in records:
            step, rank = int(record["step"]), int(record.get("rank", 0))
            steps.append({name: record.get(name) for name in STEP_COLUMNS})
            steps[-1]["step"], steps[-1]["rank"] = step, rank
            for key, label, out in (("modules", "module", modules), ("params", "param", params)):
                for name, stats in record.get(key, {}).items():
                    row = dict(stats)
                    row["step"], row["rank"], row[label] = step, rank, name
                    out.append(row)
            for name, tensors in record.get("histograms", {}).items():
                for tensor, counts in tensors.items():
                    histograms.append(
                        {
                            "step": step,
                            "rank": rank,
                            "param": name,
                            "tensor": tensor,
                            "counts": counts,
                        }
                    )
        self._columns["steps"].append(steps)
        self._columns["modules"].append(modules)
        self._columns["params"].append(params)
        self._columns["histograms"].append(histograms)
        self.events.extend(events)

    def records(self) -> list[dict[str, Any]]:
        """The step records, as written to ``history.jsonl`` (one dict per step)."""
        by_key: dict[tuple[int, int], dict[str, Any]] = {}
        steps = self.steps
        for i in range(len(steps)):
            record: dict[str, Any] = {"kind": "step"}
            for name in STEP_COLUMNS:
                record[name] = _plain(steps[name][i])
            record.update(modules={}, params={}, histograms={})
            by_key[(record["step"], record["rank"])] = record
        for label, key, spec in (
            ("modules", "module", MODULE_COLUMNS),
            ("params", "param", PARAM_COLUMNS),
        ):
            table = getattr(self, label)
            for i in range(len(table)):
                record = by_key[(int(table["step"][i]), int(table["rank"][i]))]
                record[label][table[key][i]] = {
                    c: _plain(table[c][i]) for c in spec if c not in ("step", "rank", key)
                }
        table = self.histograms
        for i in range(len(table)):
            record = by_key[(int(table["step"][i]), int(table["rank"][i]))]
            record["histograms"].setdefault(table["param"][i], {})[table["tensor"][i]] = table[
                "counts"
            ][i].tolist()
        return list(by_key.values())

    @classmethod
    def concat(cls, histories: Sequence[History]) -> History:
        """One history with the rows and events of all ``histories`` (e.g. of every rank)."""
        first = next((h for h in histories if h.format is not None), None)
        result = cls(first.format if first else None, first.bins if first else None)
        for history in histories:
            result.extend(history.records(), history.events)
        return result

    # ------------------------------------------------------------------ JSON Lines
    def header(self, rank: int = 0) -> dict[str, Any]:
        return {
            "kind": "header",
            "version": JSONL_VERSION,
            "rank": rank,
            "format": self.format,
            "bins": self.bins.to_dict() if self.bins is not None else None,
        }

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write the whole history to ``path`` (one header line, then steps, then events)."""
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(self.header()) + "\n")
            for record in self.records():
                file.write(json.dumps(record) + "\n")
            for event in self.events:
                file.write(json.dumps({"kind": "event", **event.to_dict()}) + "\n")

    @classmethod
    def from_jsonl(cls, *paths: str | os.PathLike[str]) -> History:
        """Read one or more ``history.jsonl`` files (e.g. one per rank) into one history.

        Lines are ``{"kind": "header" | "step" | "event", ...}``; non-finite numbers use
        Python's ``NaN``/``Infinity`` tokens. A truncated last line (a crashed run) is
        ignored.
        """
        if not paths:
            raise ValueError("from_jsonl needs at least one path")
        history = cls()
        for path in paths:
            records, events = [], []
            with open(path, encoding="utf-8") as file:
                lines = file.read().splitlines()
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines) - 1:
                        break  # the writer died mid-line
                    raise ValueError(f"{path}: line {number + 1} is not JSON") from None
                kind = data.get("kind")
                if kind == "header":
                    if int(data.get("version", 0)) > JSONL_VERSION:
                        raise ValueError(
                            f"{path}: version {data['version']} is newer than this reader "
                            f"({JSONL_VERSION})"
                        )
                    if history.format is None:
                        history.format = data.get("format")
                    if history.bins is None and data.get("bins") is not None:
                        history.bins = HistogramBins.from_dict(data["bins"])
                        history._columns["histograms"] = _Columns(
                            HISTOGRAM_COLUMNS, history.bins.nbins
                        )
                elif kind == "step":
                    records.append(data)
                elif kind == "event":
                    events.append(NonfiniteEvent.from_dict(data))
            history.extend(records, events)
        return history


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number/bool/str json writes."""
    if isinstance(value, np.generic):
        return value.item()
    return value
