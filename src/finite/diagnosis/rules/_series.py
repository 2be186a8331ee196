"""Series and robust statistics the rules share.

Every helper reads a :class:`~finite.monitor.History` and returns numpy arrays; none of
them warns on empty or all-NaN input (a rule that gets nothing usable returns None).
With several ranks, step series are taken from the lowest rank (every rank sees the same
loss and, after all-reduce, the same gradient norm) and per-module/per-parameter
statistics pool every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from finite.monitor import History, NonfiniteEvent, Table

#: Module types whose parameters are left out of layer-to-layer gradient comparisons:
#: an embedding's gradient touches only the rows of the tokens in the batch, and
#: normalisation gains see gradients of another scale than weight matrices.
NON_LAYER_TYPES = frozenset(
    {
        "Embedding",
        "EmbeddingBag",
        "LayerNorm",
        "RMSNorm",
        "GroupNorm",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LocalResponseNorm",
    }
)


def num(x: float) -> str:
    """A number in 3 significant digits (``1.23e+04``, ``0.0123``, ``inf``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3g}"


def percent(x: float) -> str:
    """A fraction as a percentage (``0.123`` -> ``12%``; small values keep a digit)."""
    value = 100.0 * x
    return f"{value:.1f}%" if 0 < value < 10 else f"{value:.0f}%"


def median(x: np.ndarray) -> float:
    """Median of the finite values; NaN when there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else math.nan


def quantile(x: np.ndarray, q: float) -> float:
    """``q``-quantile of the finite values; NaN when there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.quantile(x, q)) if x.size else math.nan


def rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centred running median of ``x`` over ``window`` values (shorter at the ends)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    half = window // 2
    out = np.empty(n)
    for i in range(n):
        out[i] = np.median(x[max(0, i - half) : min(n, i + half + 1)])
    return out


def step_rows(history: History) -> Table:
    """The rows of :attr:`History.steps` of the lowest rank, in step order."""
    steps = history.steps
    if len(steps) == 0:
        return steps
    rows = steps.where(rank=int(np.min(steps["rank"])))
    order = np.argsort(rows["step"], kind="stable")
    return Table({name: rows[name][order] for name in rows.columns})


def loss_nonfinite(history: History) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, loss, nonfinite)`` of the lowest rank.

    A NaN loss also means "no loss was given", so NaN counts as non-finite only when a
    finite loss was recorded before it or an event was recorded at that step; infinite
    losses always count.
    """
    rows = step_rows(history)
    steps, loss = rows["step"], rows["loss"].astype(np.float64)
    event_steps = {e.step for e in history.events if e.phase in ("input", "forward")}
    seen_finite = np.maximum.accumulate(np.isfinite(loss)) if len(loss) else np.zeros(0, bool)
    nan = np.isnan(loss)
    flagged = np.array([int(s) in event_steps for s in steps], dtype=bool)
    nonfinite = np.isinf(loss) | (nan & (seen_finite | flagged))
    return steps, loss, nonfinite


def finite_loss(history: History) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Steps and losses before the first non-finite loss, and that step (or None).

    Steps without a recorded loss are dropped.
    """
    steps, loss, nonfinite = loss_nonfinite(history)
    first_bad = None
    if nonfinite.any():
        index = int(np.argmax(nonfinite))
        first_bad = int(steps[index])
        steps, loss = steps[:index], loss[:index]
    keep = np.isfinite(loss)
    return steps[keep], loss[keep], first_bad


def by_name(table: Table, key: str) -> dict[str, Table]:
    """Rows of ``table`` grouped by the ``key`` column, in order of first appearance."""
    names = table[key] if len(table) else np.empty(0, dtype=object)
    return {name: table.where(**{key: name}) for name in dict.fromkeys(names.tolist())}


def skipped_steps(history: History) -> set[int]:
    """Steps whose optimizer step a loss scaler skipped."""
    rows = step_rows(history)
    return {int(s) for s in rows["step"][rows["skipped"]]} if len(rows) else set()


def module_types(history: History) -> dict[str, str]:
    """Module path -> class name, from the activation table."""
    modules = history.modules
    if len(modules) == 0:
        return {}
    return dict(zip(modules["module"].tolist(), modules["type"].tolist(), strict=True))


def owner(param: str) -> str:
    """The module path of a parameter name (``"encoder.0.weight"`` -> ``"encoder.0"``)."""
    return param.rsplit(".", 1)[0] if "." in param else ""


def events_at(events: Iterable[NonfiniteEvent], step: int) -> list[NonfiniteEvent]:
    """Events of one step, input events first, then forward, then backward."""
    order = {"input": 0, "forward": 1, "backward": 2}
    found = [e for e in events if e.step == step]
    return sorted(found, key=lambda e: (order.get(e.phase, 3), e.rank))


def growth_before(steps: np.ndarray, values: np.ndarray, step: int, window: int = 20) -> float:
    """How many times the last finite value before ``step`` exceeds the median of the
    ``window`` values before it (NaN when there are too few)."""
    before = values[(steps < step) & np.isfinite(values)]
    if len(before) < 2:
        return math.nan
    base = median(before[-window - 1 : -1])
    return float(before[-1] / base) if base > 0 else math.nan
