"""Where synced statistics go besides :class:`History`: a JSON Lines file and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finite.monitor.events import NonfiniteEvent
from finite.monitor.histograms import HistogramBins

__all__ = ["JsonlWriter", "TensorBoardWriter", "jsonl_path"]


def jsonl_path(log_dir: str | os.PathLike[str], rank: int) -> Path:
    """``log_dir/history.jsonl`` on rank 0, ``log_dir/history.rank{r}.jsonl`` elsewhere."""
    name = "history.jsonl" if rank == 0 else f"history.rank{rank}.jsonl"
    return Path(log_dir) / name


class JsonlWriter:
    """Appends step records and events to ``history.jsonl``, one JSON object per line.

    The file is started afresh (header line first) unless ``append``; each write is
    flushed, so a crashed run leaves every synced step on disk.
    """

    def __init__(self, path: Path, header: dict[str, Any], append: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not append or not path.exists() or path.stat().st_size == 0
        self.path = path
        self._file = open(path, "w" if not append else "a", encoding="utf-8")
        if fresh:
            self._file.write(json.dumps(header) + "\n")
            self._file.flush()

    def write(self, records: Sequence[dict[str, Any]], events: Sequence[NonfiniteEvent]) -> None:
        lines = [json.dumps(record) for record in records]
        lines += [json.dumps({"kind": "event", **event.to_dict()}) for event in events]
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Writes scalars and histograms with ``torch.utils.tensorboard.SummaryWriter``.

    Tags: ``loss``, ``loss_scale``, ``grad_norm``; ``activations/<module>/<stat>``;
    ``gradients/<param>/<stat>``, ``updates/<param>/update_ratio``;
    ``histograms/<param>/<weight|grad>`` with log2-magnitude bucket limits.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is an optional extra
            raise ImportError(
                "tensorboard=True needs the tensorboard package: pip install tensorboard"
            ) from error
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, records: Sequence[dict[str, Any]], bins: HistogramBins | None) -> None:
        add = self._writer.add_scalar
        for record in records:
            step = record["step"]
            for name in ("loss", "loss_scale", "grad_norm"):
                value = record.get(name)
                if value is not None and not math.isnan(value):
                    add(name, value, step)
            for module, stats in record.get("modules", {}).items():
                for stat in (
                    "absmax",
                    "rms",
                    "headroom_bits",
                    "dead_fraction",
                    "saturated_fraction",
                ):
                    value = stats.get(stat)
                    if value is not None and math.isfinite(value):
                        add(f"activations/{module or '<model>'}/{stat}", value, step)
            for param, stats in record.get("params", {}).items():
                for stat in ("grad_norm", "grad_underflow_fraction", "grad_subnormal_fraction"):
                    value = stats.get(stat)
                    if value is not None and math.isfinite(value):
                        add(f"gradients/{param}/{stat}", value, step)
                value = stats.get("update_ratio")
                if value is not None and math.isfinite(value):
                    add(f"updates/{param}/update_ratio", value, step)
            if bins is None:
                continue
            # Bucket limits in log2 units: zeros and values below 2**low share the first.
            limits = [float(bins.low - 1), *[float(k + 1) for k in bins.exponents], math.inf]
            for param, tensors in record.get("histograms", {}).items():
                for tensor, counts in tensors.items():
                    finite_counts = [counts[0] + counts[1], *counts[2:-1]]
                    total = sum(finite_counts)
                    if total == 0:
                        continue
                    self._writer.add_histogram_raw(
                        f"histograms/{param}/{tensor}",
                        min=float(bins.low - 1),
                        max=float(bins.high),
                        num=total,
                        sum=0.0,
                        sum_squares=0.0,
                        bucket_limits=limits,
                        bucket_counts=finite_counts,
                        global_step=step,
                    )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
