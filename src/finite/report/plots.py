"""The report's plots: one function per plot, each turning a :class:`History` into a PNG.

Every function returns a :class:`Plot`; when the history lacks what a plot needs (no
loss was given, no scaler, no histograms, a column missing) the plot is omitted:
``png`` is ``None`` and ``note`` says why, so that a partial history still gives a
report. Figures are drawn with matplotlib's Agg canvas directly (no ``pyplot``, so no
global backend or figure state changes), and PNGs carry no metadata.

A history with several ranks is plotted for its lowest rank; the note says so.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from finite.diagnosis.finding import PLOTS
from finite.formats import get_format
from finite.monitor.histograms import HistogramBins
from finite.monitor.history import History, Table
from finite.report.spikes import loss_spikes

__all__ = [
    "INSTALL_HINT",
    "Plot",
    "make_plots",
    "plot_grad_norm",
    "plot_grad_norm_heatmap",
    "plot_histograms",
    "plot_loss",
    "plot_loss_scale",
    "plot_update_ratio",
    "require_matplotlib",
]

#: How to install the plotting dependency.
INSTALL_HINT = "pip install 'finite[plot]'"

_WIDTH_INCHES, _HEIGHT_INCHES, _DPI = 8.0, 3.2, 100
_SKIPPED, _NONFINITE, _SPIKE, _THRESHOLD = "tab:orange", "tab:red", "tab:purple", "tab:red"
# Shading of what rounding to the format does to a magnitude (HistogramBins.bands).
_BANDS = {
    "zero": ("0.55", "flushes to 0"),
    "subnormal": ("tab:olive", "subnormal"),
    "normal": ("tab:green", "normal"),
    "overflow": ("tab:red", "overflows"),
}
_MAX_LABELLED_ROWS = 48
_MAX_LEGEND_LINES = 10


@dataclass(frozen=True)
class Plot:
    """One rendered (or omitted) plot of the report.

    Attributes
    ----------
    name : str
        One of :data:`finite.diagnosis.PLOTS`; findings' evidence points at it by name.
    title : str
        Heading shown above the plot.
    png : bytes or None
        The PNG image; ``None`` when the plot was omitted.
    note : str
        Why the plot was omitted, or what it shows that is easy to miss.
    """

    name: str
    title: str
    png: bytes | None
    note: str = ""

    @property
    def anchor(self) -> str:
        """The HTML ``id`` of the plot's section in ``report.html``."""
        return f"plot-{self.name}"

    @property
    def filename(self) -> str:
        """The PNG's file name in the report directory."""
        return f"{self.name}.png"


def require_matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, or an ImportError that says how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            f"finite's report plots need matplotlib, which is not installed: {INSTALL_HINT}"
        ) from error
    return Figure, FigureCanvasAgg


def make_plots(history: History, *, clip_threshold: float | None = None) -> list[Plot]:
    """Every plot of the report, in the order of :data:`finite.diagnosis.PLOTS`."""
    makers: dict[str, Callable[[], Plot]] = {
        "loss": lambda: plot_loss(history),
        "grad_norm": lambda: plot_grad_norm(history, clip_threshold=clip_threshold),
        "grad_norm_heatmap": lambda: plot_grad_norm_heatmap(history),
        "histograms": lambda: plot_histograms(history),
        "loss_scale": lambda: plot_loss_scale(history),
        "update_ratio": lambda: plot_update_ratio(history),
    }
    return [makers[name]() for name in PLOTS]


# ---------------------------------------------------------------------------- helpers


def _figure(height: float = _HEIGHT_INCHES, width: float = _WIDTH_INCHES) -> Any:
    figure_class, canvas_class = require_matplotlib()
    figure = figure_class(figsize=(width, height), layout="constrained")
    canvas_class(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # metadata={"Software": None}: no matplotlib version string (with its web address)
    # inside the image, so the report carries no address of any kind.
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _omitted(name: str, title: str, note: str) -> Plot:
    return Plot(name=name, title=title, png=None, note=note)


def _missing(table: Table, *columns: str) -> str:
    absent = [c for c in columns if c not in table]
    return f"the history has no column {', '.join(map(repr, absent))}" if absent else ""


def _shown_rank(history: History) -> tuple[int | None, str]:
    """The rank whose rows are plotted (the lowest), and a note when there are several."""
    ranks: set[int] = set()
    for table in (history.steps, history.params, history.histograms):
        if "rank" in table:
            ranks.update(int(r) for r in np.unique(table["rank"]))
    if not ranks:
        return None, ""
    rank = min(ranks)
    note = f"rank {rank} of {len(ranks)} ranks shown" if len(ranks) > 1 else ""
    return rank, note


def _of_rank(table: Table, rank: int | None) -> Table:
    if rank is None or "rank" not in table:
        return table
    return table.where(rank=rank)


def _rank_rows(history: History, table: str, *columns: str) -> tuple[Table, str, str]:
    """The shown rank's rows of ``history.<table>``, the rank note, and why ``columns``
    cannot be plotted ("" when they can)."""
    rank, rank_note = _shown_rank(history)
    rows = _of_rank(getattr(history, table), rank)
    return rows, rank_note, _missing(rows, *columns)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _mark_steps(ax: Any, steps: np.ndarray, color: str, label: str) -> None:
    """Vertical lines across the axes at ``steps`` (one collection, however many)."""
    if len(steps):
        ax.vlines(
            steps,
            0.0,
            1.0,
            transform=ax.get_xaxis_transform(),
            colors=color,
            linewidth=0.8,
            alpha=0.5,
            label=f"{label} ({len(steps)})",
        )


def _log_scale_if_wide(ax: Any, values: np.ndarray) -> None:
    """Log y axis for positive values that span more than two decades."""
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
        ax.set_yscale("log")


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _step_marks(steps: Table) -> tuple[np.ndarray, np.ndarray]:
    """Steps skipped by the scaler and steps with non-finite gradients."""
    step = steps["step"]
    skipped = step[steps["skipped"].astype(bool)] if "skipped" in steps else step[:0]
    bad = np.zeros(len(step), dtype=bool)
    if "nonfinite_grads" in steps:
        bad |= steps["nonfinite_grads"] > 0
    if "grad_norm" in steps:
        bad |= np.isinf(steps["grad_norm"].astype(np.float64))
    return skipped, step[bad]


# ---------------------------------------------------------------------------- plots


def plot_loss(history: History) -> Plot:
    """Loss per step; steps the scaler skipped, inf/NaN losses and loss spikes marked.

    Spikes follow :func:`finite.report.spikes.loss_spikes` (the ``SpikeGuard`` rule).
    """
    name, title = "loss", "Loss"
    steps, rank_note, missing = _rank_rows(history, "steps", "step", "loss")
    if missing:
        return _omitted(name, title, missing)
    step, loss = steps["step"], steps["loss"].astype(np.float64)
    if len(step) == 0 or np.isnan(loss).all():
        return _omitted(name, title, "no loss was recorded (pass it to monitor.step(loss))")
    nonfinite = ~np.isfinite(loss)
    spikes = loss_spikes(loss)
    skipped, _ = _step_marks(steps)

    figure = _figure()
    ax = figure.add_subplot()
    ax.plot(step, _finite_or_nan(loss), color="tab:blue", linewidth=1.0, label="loss")
    if spikes.any():
        ax.scatter(
            step[spikes],
            loss[spikes],
            s=36,
            facecolors="none",
            edgecolors=_SPIKE,
            label=f"spike ({int(spikes.sum())})",
            zorder=3,
        )
    _mark_steps(ax, skipped, _SKIPPED, "skipped step")
    _mark_steps(ax, step[nonfinite], _NONFINITE, "inf/NaN loss")
    _log_scale_if_wide(ax, loss)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize="small")
    lost = int(nonfinite.sum())
    plural = "" if lost == 1 else "s"
    lost_note = f"{lost} step{plural} without a finite loss (inf, NaN or not given)" if lost else ""
    note = _join(rank_note, lost_note)
    return Plot(name, title, _png(figure), note)


def plot_grad_norm(history: History, *, clip_threshold: float | None = None) -> Plot:
    """Global gradient norm per step, with the clipping threshold when one is given."""
    name, title = "grad_norm", "Global gradient norm"
    if clip_threshold is not None and not (
        isinstance(clip_threshold, (int, float)) and not isinstance(clip_threshold, bool)
    ):
        raise TypeError(f"clip_threshold must be a number, got {type(clip_threshold).__name__}")
    steps, rank_note, missing = _rank_rows(history, "steps", "step", "grad_norm")
    if missing:
        return _omitted(name, title, missing)
    step, norm = steps["step"], steps["grad_norm"].astype(np.float64)
    if len(step) == 0 or np.isnan(norm).all():
        return _omitted(name, title, "no backward pass was recorded")
    skipped, nonfinite = _step_marks(steps)

    figure = _figure()
    ax = figure.add_subplot()
    ax.plot(step, _finite_or_nan(norm), color="tab:blue", linewidth=1.0, label="grad norm")
    if clip_threshold is not None and math.isfinite(clip_threshold):
        ax.axhline(
            clip_threshold,
            color=_THRESHOLD,
            linestyle="--",
            linewidth=1.0,
            label=f"clip threshold {clip_threshold:.3g}",
        )
    _mark_steps(ax, skipped, _SKIPPED, "skipped step")
    _mark_steps(ax, nonfinite, _NONFINITE, "inf/NaN gradient")
    _log_scale_if_wide(ax, norm)
    ax.set_xlabel("step")
    ax.set_ylabel("L2 norm (unscaled)")
    ax.legend(loc="best", fontsize="small")
    note = _join(rank_note, "" if clip_threshold is not None else "no clip threshold given")
    return Plot(name, title, _png(figure), note)


def plot_loss_scale(history: History) -> Plot:
    """The loss scaler's scale per step (log2 axis), with skipped steps marked."""
    name, title = "loss_scale", "Loss scale"
    steps, rank_note, missing = _rank_rows(history, "steps", "step", "loss_scale")
    if missing:
        return _omitted(name, title, missing)
    step, scale = steps["step"], steps["loss_scale"].astype(np.float64)
    if len(step) == 0 or np.isnan(scale).all():
        return _omitted(name, title, "no loss scaler was monitored (Monitor(scaler=...))")
    skipped, _ = _step_marks(steps)

    figure = _figure()
    ax = figure.add_subplot()
    shown = np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)
    ax.plot(step, shown, color="tab:blue", drawstyle="steps-post", label="loss scale")
    if np.isfinite(shown).any():
        ax.set_yscale("log", base=2)
    _mark_steps(ax, skipped, _SKIPPED, "skipped step")
    ax.set_xlabel("step")
    ax.set_ylabel("scale")
    ax.legend(loc="best", fontsize="small")
    return Plot(name, title, _png(figure), rank_note)


def plot_grad_norm_heatmap(history: History) -> Plot:
    """log10 of each parameter's gradient norm over the measured steps.

    Rows follow the model's parameter order (first layers on top). White: no finite
    value (no gradient, or a zero norm); red: a gradient with inf/NaN.
    """
    name, title = "grad_norm_heatmap", "Gradient norm per parameter"
    params, rank_note, missing = _rank_rows(history, "params", "step", "param", "grad_norm")
    if missing:
        return _omitted(name, title, missing)
    norm = params["grad_norm"].astype(np.float64)
    if len(params) == 0 or np.isnan(norm).all():
        return _omitted(name, title, "no per-parameter gradient statistics were recorded")
    names = list(dict.fromkeys(params["param"].tolist()))
    row_of = {n: i for i, n in enumerate(names)}
    steps = np.unique(params["step"])
    rows = np.fromiter((row_of[n] for n in params["param"]), dtype=np.int64, count=len(params))
    cols = np.searchsorted(steps, params["step"])
    grid = np.full((len(names), len(steps)), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        grid[rows, cols] = np.where(norm > 0, np.log10(norm), np.nan)
    grid[~np.isfinite(grid)] = np.nan
    bad = np.zeros_like(grid, dtype=bool)
    bad_rows = np.isinf(norm)
    if "grad_nonfinite" in params:
        count = params["grad_nonfinite"]
        # -1 is "some inf/NaN, not counted" or "no gradient": a NaN norm at a step whose
        # gradients held inf/NaN is taken as the former.
        steps_table, _, _ = _rank_rows(history, "steps")
        if "nonfinite_grads" in steps_table:
            bad_steps = steps_table["step"][steps_table["nonfinite_grads"] > 0]
            bad_rows |= (count == -1) & np.isnan(norm) & np.isin(params["step"], bad_steps)
        bad_rows |= count > 0
    bad[rows[bad_rows], cols[bad_rows]] = True

    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    height = min(max(2.6, 0.16 * len(names) + 1.4), 14.0)
    figure = _figure(height=height)
    ax = figure.add_subplot()
    x_edges = _edges(steps.astype(np.float64))
    y_edges = np.arange(len(names) + 1, dtype=np.float64)
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid), cmap="viridis")
    if bad.any():
        ax.pcolormesh(
            x_edges,
            y_edges,
            np.ma.masked_where(~bad, np.ones_like(grid)),
            cmap=ListedColormap([_NONFINITE]),
        )
        ax.legend(
            handles=[Patch(color=_NONFINITE, label="inf/NaN gradient")],
            loc="upper right",
            fontsize="small",
        )
    figure.colorbar(mesh, ax=ax, label="log10 grad norm")
    every = max(1, math.ceil(len(names) / _MAX_LABELLED_ROWS))
    ax.set_yticks(np.arange(0, len(names), every) + 0.5)
    ax.set_yticklabels([_short(n) for n in names[::every]], fontsize="x-small")
    ax.set_ylim(len(names), 0)
    ax.set_xlabel("step")
    return Plot(name, title, _png(figure), rank_note)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges halfway between sorted centres (width 1 for a single centre)."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[:-1] + centres[1:]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def _format_bands(history: History) -> tuple[dict[str, tuple[float, float]], str]:
    """The format's bands (from ``get_format``), else the bands stored with the bins."""
    if history.format is not None:
        try:
            fmt = get_format(history.format)
        except (ValueError, TypeError, KeyError):
            pass
        else:
            return HistogramBins.for_format(fmt).bands, fmt.name
    assert history.bins is not None
    return history.bins.bands, history.format or "the monitored format"


def plot_histograms(history: History) -> Plot:
    """log2-magnitude histograms of all weights and all gradients, against the format.

    Counts of every parameter are summed, at the last step with histograms (bars) and
    the first (outline). The background shows what rounding to the format does to each
    magnitude: flush to zero, subnormal, normal, overflow.
    """
    name, title = "histograms", "Exponent histograms (log2 magnitude)"
    table, rank_note, missing = _rank_rows(history, "histograms", "step", "tensor", "counts")
    if missing:
        return _omitted(name, title, missing)
    bins = history.bins
    if bins is None or len(table) == 0:
        return _omitted(
            name, title, "no histograms were recorded (Monitor(histograms_every=...) > 0)"
        )
    counts = np.asarray(table["counts"])
    if counts.ndim != 2 or counts.shape[1] != bins.nbins:
        return _omitted(
            name, title, f"histogram counts of shape {counts.shape} do not match {bins.nbins} bins"
        )
    bands, format_name = _format_bands(history)
    first, last = int(table["step"].min()), int(table["step"].max())
    # Regular bins at [k, k + 1); below 2**low at [low - 1, low); 2**high and up at
    # [high, high + 1). Zeros and inf/NaN have no magnitude: they are counted in text.
    edges = np.arange(bins.low - 1, bins.high + 2, dtype=np.float64)

    from matplotlib.patches import Patch

    figure = _figure(height=3.6, width=10.0)
    axes = figure.subplots(1, 2, sharey=True)
    scaled = "loss_scale" in history.steps and np.isfinite(history.steps["loss_scale"]).any()
    grad_label = "gradients (as stored: scaled)" if scaled else "gradients"
    for ax, tensor, label in zip(axes, ("weight", "grad"), ("weights", grad_label), strict=True):
        for band, (start, end) in bands.items():
            color = _BANDS.get(band, ("0.8", band))[0]
            lo, hi = max(start, edges[0]), min(end, edges[-1])
            if hi > lo:
                ax.axvspan(lo, hi, color=color, alpha=0.13, linewidth=0)
        is_tensor = table["tensor"] == tensor
        at_last = counts[is_tensor & (table["step"] == last)].sum(axis=0)
        if not at_last.any():
            ax.text(0.5, 0.5, "none recorded", ha="center", transform=ax.transAxes)
        else:
            ax.bar(edges[:-1], at_last[1:-1], width=1.0, align="edge", color="tab:blue")
            if first != last:
                at_first = counts[is_tensor & (table["step"] == first)].sum(axis=0)
                ax.stairs(at_first[1:-1], edges, color="black", linewidth=0.8, baseline=None)
            ax.set_yscale("log")
            ax.text(
                0.01,
                0.97,
                f"zeros {int(at_last[0])}, inf/NaN {int(at_last[-1])}",
                transform=ax.transAxes,
                va="top",
                fontsize="small",
            )
        ax.set_title(label)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("log2 |x|")
    axes[0].set_ylabel("elements")
    handles = [
        Patch(color=_BANDS[b][0], alpha=0.3, label=_BANDS[b][1]) for b in bands if b in _BANDS
    ]
    handles.append(Patch(color="tab:blue", label=f"step {last}"))
    if first != last:
        handles.append(Patch(facecolor="none", edgecolor="black", label=f"step {first}"))
    axes[1].legend(handles=handles, loc="upper right", fontsize="x-small")
    figure.suptitle(f"all parameters, against {format_name}", fontsize="medium")
    return Plot(name, title, _png(figure), rank_note)


def plot_update_ratio(history: History) -> Plot:
    """``|update| / |weight|`` per parameter over the measured steps.

    The dashed line is half the format's machine epsilon: an update much smaller than
    that, relative to its weight, is rounded away when the weights are stored in the
    format (see ``docs/precision.md``).
    """
    name, title = "update_ratio", "Update ratio per parameter"
    params, rank_note, missing = _rank_rows(history, "params", "step", "param", "update_ratio")
    if missing:
        return _omitted(name, title, missing)
    ratio = params["update_ratio"].astype(np.float64)
    if len(params) == 0 or np.isnan(ratio).all():
        return _omitted(name, title, "no optimizer updates were recorded (Monitor(optimizer=...))")
    names = list(dict.fromkeys(params["param"].tolist()))

    from matplotlib import colormaps

    figure = _figure()
    ax = figure.add_subplot()
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(names)))
    shown = np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.nan)
    for color, param in zip(colors, names, strict=True):
        rows = params["param"] == param
        ax.plot(params["step"][rows], shown[rows], color=color, linewidth=1.0, label=_short(param))
    if np.isfinite(shown).any():
        ax.set_yscale("log")
    notes = [rank_note]
    if history.format is not None:
        try:
            fmt = get_format(history.format)
        except (ValueError, TypeError, KeyError):
            fmt = None
        if fmt is not None:
            ax.axhline(
                fmt.eps / 2,
                color=_THRESHOLD,
                linestyle="--",
                linewidth=1.0,
                label=f"{fmt.name} eps/2 = 2^{math.log2(fmt.eps / 2):.0f}",
            )
    if len(names) <= _MAX_LEGEND_LINES:
        ax.legend(loc="best", fontsize="x-small")
    else:
        notes.append(f"{len(names)} parameters, coloured in model order (dark: first)")
    ax.set_xlabel("step")
    ax.set_ylabel("|update| / |weight|")
    return Plot(name, title, _png(figure), _join(*notes))
