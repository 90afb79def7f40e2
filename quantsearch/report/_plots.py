"""Figures of a study: the accuracy/size front, per-layer bits of the front, hypervolume history.

Every function builds its own :class:`matplotlib.figure.Figure` on the Agg canvas (no pyplot, so
no global figure state) and returns it, so callers and tests can read the plotted data back from
``fig.axes[0].collections`` / ``.lines`` / ``.images``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    PercentFormatter,
)

from quantsearch._paths import replacing
from quantsearch._units import format_count, format_size
from quantsearch.report._objectives import (
    Axis,
    front_mask,
    hypervolume_history,
    objective_axes,
)
from quantsearch.report._table import BITS_PREFIX, bits_columns, pareto_frame

__all__ = [
    "bits_heatmap_figure",
    "format_size",
    "history_figure",
    "pareto_figure",
    "save_figure",
]

_FRONT_COLOR = "#d95f02"
_TRIAL_COLOR = "#1f77b4"
_FLOAT_COLOR = "#e6ab02"
_BASELINE_COLOR = "#7570b3"
_FAILED_COLOR = "#d62728"
_MUTED = "#9a9a9a"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG or SVG (by suffix) without timestamps, so reruns give the same file."""
    path = Path(path)
    with replacing(path) as temporary:
        if path.suffix == ".svg":
            with matplotlib.rc_context({"svg.hashsalt": "quantsearch", "svg.fonttype": "none"}):
                fig.savefig(temporary, format="svg", metadata={"Date": None})
        else:
            fig.savefig(temporary, format="png", dpi=150, metadata={"Software": None})
    return path


_TICK_SUBS: tuple[tuple[float, ...], ...] = (
    (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0),
    (1.0, 2.0, 3.0, 5.0, 7.0),
    (1.0, 2.0, 5.0),
    (1.0, 3.0),
    (1.0,),
)


def _ticks_in_range(subs: tuple[float, ...], low: float, high: float) -> int:
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    return sum(low <= sub * 10.0**d <= high for d in decades for sub in subs)


def _size_axis(ax: matplotlib.axes.Axes, sizes: np.ndarray) -> None:
    """Log-scaled x axis of model sizes with KB/MB tick labels."""
    ax.set_xscale("log")
    finite = sizes[np.isfinite(sizes) & (sizes > 0)]
    if finite.size == 0:
        return
    low, high = float(finite.min()) / 1.35, float(finite.max()) * 1.35
    ax.set_xlim(low, high)
    # The densest of these tick sets that puts at most six labels in range.
    subs: tuple[float, ...] = (1.0,)
    for candidate in _TICK_SUBS:
        if _ticks_in_range(candidate, low, high) <= 6:
            subs = candidate
            break
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(format_size))
    ax.xaxis.set_minor_locator(LogLocator(base=10.0, subs=np.arange(1.0, 10.0)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _baseline_style(label: str) -> tuple[str, str, float]:
    if label == "float":
        return _FLOAT_COLOR, "*", 260.0
    return _BASELINE_COLOR, "D", 70.0


def _pair_front(frame: pd.DataFrame, x: Axis, y: Axis) -> pd.DataFrame:
    """The feasible complete trials no other one beats on both ``x`` and ``y``, by ``x``."""
    candidates = frame[
        (frame["state"] == "COMPLETE") & frame["feasible"] & frame["duplicate_of"].isna()
    ]
    if candidates.empty:
        return candidates
    values = np.column_stack([x.unit(candidates[x.name]), y.unit(candidates[y.name])])
    front = candidates[front_mask(values)]
    return front.sort_values([x.name, "number"], kind="stable")


def _value_axis(ax: matplotlib.axes.Axes, which: str, axis: Axis, values: np.ndarray) -> None:
    """A relative metric on a log scale (sizes in KB/MB), accuracy in percent."""
    target = ax.xaxis if which == "x" else ax.yaxis
    if axis.name == "size_bytes" and which == "x":
        _size_axis(ax, values)
        ax.set_xlabel("model size (log scale)")
        return
    if axis.relative:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        formatter = format_size if axis.name == "size_bytes" else format_count
        target.set_major_formatter(FuncFormatter(lambda v, _pos: formatter(v)))
        label = f"{axis.label} (log scale)"
    else:
        if axis.name == "accuracy" or axis.proportion:
            target.set_major_formatter(PercentFormatter(xmax=1.0))
        label = axis.label
    (ax.set_xlabel if which == "x" else ax.set_ylabel)(label)


def _short(axis: Axis | None, value: float) -> str:
    """A point's label: 97.4% for accuracy (and proportions), else the metric's format."""
    if axis is None or axis.name == "accuracy" or axis.proportion:
        return f"{value:.1%}"
    if axis.relative:
        return format_count(value)
    return axis.format(value, short=True)


def _axis_words(axis: Axis) -> str:
    if axis.relative:
        return f"{axis.name} / float"
    return axis.name


def pareto_figure(
    frame: pd.DataFrame,
    *,
    x: Axis | None = None,
    y: Axis | None = None,
    title: str | None = None,
) -> Figure:
    """One objective against another (default: validation accuracy against model size, log
    axis), one point per trial.

    Artists, by label: ``trials`` (feasible complete trials, dots; absent if none),
    ``infeasible (n)`` (hollow grey circles), ``failed (n)`` / ``pruned (n)`` ('x' / '+' markers
    on the bottom edge, at the trial's x value when it was recorded: their y offsets are in axes
    units), ``Pareto front`` (a post-step line through the trials no other one beats on both
    axes, sorted by x), one scatter per baseline with gid ``baseline:<label>`` and a text label
    (``float`` drawn as a large star), and ``float accuracy`` (a dotted horizontal line, when y is
    the accuracy).
    """
    if x is None or y is None:
        default_x, default_y = objective_axes(frame, metric_names=["size_bytes", "accuracy"])
        x = x or default_x
        y = y or default_y
    fig = _new_figure(8.0, 5.2)
    ax = fig.add_subplot()
    complete = frame[frame["state"] == "COMPLETE"]
    is_baseline = complete["baseline"].notna()
    feasible = complete[complete["feasible"] & ~is_baseline]
    infeasible = complete[~complete["feasible"] & ~is_baseline]

    if not feasible.empty:
        ax.scatter(
            feasible[x.name],
            feasible[y.name],
            s=28,
            color=_TRIAL_COLOR,
            alpha=0.65,
            linewidths=0,
            label="trials",
            zorder=3,
        )
    if not infeasible.empty:
        ax.scatter(
            infeasible[x.name],
            infeasible[y.name],
            s=30,
            facecolors="none",
            edgecolors=_MUTED,
            linewidths=1.0,
            label=f"infeasible ({len(infeasible)})",
            zorder=2,
        )

    front = _pair_front(frame, x, y)
    if not front.empty:
        ax.step(
            front[x.name],
            front[y.name],
            where="post",
            color=_FRONT_COLOR,
            linewidth=1.8,
            marker="o",
            markersize=6,
            markerfacecolor="white",
            markeredgewidth=1.6,
            label="Pareto front",
            zorder=4,
        )

    xs = frame[x.name].to_numpy(dtype=float)
    legend_done: set[str] = set()
    for _, row in complete[is_baseline].sort_values(x.name).iterrows():
        label = str(row["baseline"])
        color, marker, size = _baseline_style(label)
        group = "float" if label == "float" else "baselines"
        edge = "black" if label == "float" else "white"
        ax.scatter(
            [row[x.name]],
            [row[y.name]],
            s=size,
            marker=marker,
            color=color,
            edgecolors=edge,
            linewidths=0.7,
            label=group if group not in legend_done else "_nolegend_",
            gid=f"baseline:{label}",
            zorder=5,
        )
        legend_done.add(group)
        # Labels of points in the right half go to their left, so they stay inside the axes.
        right_half = row[x.name] > math.sqrt(np.nanmin(xs) * np.nanmax(xs))
        ax.annotate(
            f"{label}\n{_short(y, row[y.name])} · {format_size(row['size_bytes'])}",
            (row[x.name], row[y.name]),
            xytext=(-9 if right_half else 7, -18 if label == "float" else 6),
            textcoords="offset points",
            ha="right" if right_half else "left",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
            fontsize=8,
            color="black" if label == "float" else _BASELINE_COLOR,
            fontweight="bold" if label == "float" else "normal",
            zorder=6,
        )
        if label == "float" and not y.relative:
            ax.axhline(
                row[y.name],
                color=_FLOAT_COLOR,
                linestyle=":",
                linewidth=1.2,
                label=f"float {y.name}",
                zorder=1,
            )

    # Unfinished trials have no y value: they sit on the bottom edge at their x, if known.
    bottom = ax.get_xaxis_transform()
    for state, marker, color in (("FAIL", "x", _FAILED_COLOR), ("PRUNED", "+", _MUTED)):
        rows = frame[frame["state"] == state]
        if rows.empty:
            continue
        placed = rows[rows[x.name].notna()]
        ax.scatter(
            placed[x.name],
            np.full(len(placed), 0.03),
            transform=bottom,
            marker=marker,
            s=40,
            color=color,
            linewidths=1.4,
            label=f"{'failed' if state == 'FAIL' else 'pruned'} ({len(rows)})",
            clip_on=False,
            zorder=3,
        )

    _value_axis(ax, "x", x, xs)
    _value_axis(ax, "y", y, frame[y.name].to_numpy(dtype=float))
    # Room above the highest point for the baselines' labels.
    ax.margins(y=0.1)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="x", alpha=0.1)
    ax.set_title(title or f"{y.label.capitalize()} against {x.label}")
    ax.legend(loc="lower right" if y.maximize else "upper right", fontsize=8, framealpha=0.9)
    return fig


def _heatmap_rows(frame: pd.DataFrame, layers: Sequence[str] | None) -> list[tuple[str, str]]:
    """(layer, quant type) rows: each quantized tensor; a weight row per never-quantized layer."""
    rows: list[tuple[str, str]] = []
    by_layer: dict[str, list[str]] = {}
    for column in bits_columns(frame):
        layer, qtype = column[len(BITS_PREFIX) :].rsplit(".", 1)
        by_layer.setdefault(layer, []).append(qtype)
    order = list(layers or [])
    order += [layer for layer in by_layer if layer not in order]
    for layer in order:
        rows.extend((layer, qtype) for qtype in by_layer.get(layer, ["weight"]))
    return rows


def bits_heatmap_figure(
    frame: pd.DataFrame,
    *,
    layers: Sequence[str] | None = None,
    front: pd.DataFrame | None = None,
    quality: Axis | None = None,
) -> Figure:
    """Bit width of every quantized tensor (rows) for each front trial (columns, by size);
    the columns are labelled with ``quality``'s value (default: the validation accuracy).

    ``fig.axes[0].images[0].get_array()`` holds the bits, masked where the tensor stays float.
    ``layers`` (model order) adds a float row for each layer that no trial quantized.
    ``front``: ``pareto_frame(frame)``, when the caller has it already.
    """
    front = pareto_frame(frame) if front is None else front
    rows = _heatmap_rows(frame, layers)
    if front.empty or not rows:
        fig = _new_figure(6.0, 2.0)
        ax = fig.add_subplot()
        ax.axis("off")
        message = (
            "no trial on the Pareto front (no complete trial meets the constraints)"
            if front.empty
            else "no per-layer bit widths were recorded"
        )
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
        return fig

    values = np.full((len(rows), len(front)), np.nan)
    for i, (layer, qtype) in enumerate(rows):
        column = f"{BITS_PREFIX}{layer}.{qtype}"
        if column in front.columns:
            values[i] = front[column].to_numpy(dtype=float)

    width = min(24.0, max(7.0, 2.8 + 0.62 * len(front)))
    height = min(24.0, 1.9 + 0.32 * len(rows))
    fig = _new_figure(width, height)
    ax = fig.add_subplot()
    levels = sorted({int(v) for v in values[np.isfinite(values)]}) or [8]
    palette = matplotlib.colormaps["viridis"].resampled(max(len(levels), 2))
    colors = [palette(i) for i in range(len(levels))]
    cmap = ListedColormap(colors).with_extremes(bad="#e4e4e4")
    # Each distinct bit width gets its own colour; boundaries sit halfway between widths.
    edges = [levels[0] - 0.5, *((a + b) / 2 for a, b in pairwise(levels)), levels[-1] + 0.5]
    norm = BoundaryNorm(edges, cmap.N)
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest"
    )
    for (i, j), bits in np.ndenumerate(values):
        if np.isfinite(bits):
            shade = levels.index(int(bits)) / max(len(levels) - 1, 1)
            ax.text(
                j,
                i,
                f"{int(bits)}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shade < 0.6 else "black",
            )
        else:
            ax.text(j, i, "fp", ha="center", va="center", fontsize=7, color=_MUTED)
    ax.set_yticks(range(len(rows)), [f"{layer} ({qtype})" for layer, qtype in rows], fontsize=8)
    column_labels = [
        f"#{int(r['number'])}\n{format_size(r['size_bytes'])}\n"
        f"{_short(quality, r[quality.name]) if quality else format(r['accuracy'], '.1%')}"
        + (f"\n{r['baseline']}" if isinstance(r["baseline"], str) else "")
        for _, r in front.iterrows()
    ]
    ax.set_xticks(range(len(front)), column_labels, fontsize=7)
    ax.tick_params(length=0)
    shown = "accuracy" if quality is None else quality.name
    ax.set_xlabel(f"front trials, smallest first (trial number, size, validation {shown})")
    ax.set_title("Bit width per layer on the Pareto front (fp = float)")
    bar = fig.colorbar(image, ax=ax, ticks=levels, fraction=0.04, pad=0.02)
    bar.set_label("bits")
    return fig


def history_figure(
    frame: pd.DataFrame,
    *,
    float_size_bytes: float | None = None,
    axes: Sequence[Axis] | None = None,
    history: pd.DataFrame | None = None,
) -> Figure:
    """Hypervolume (``fig.axes[0]``) and front size (``fig.axes[1]``) after each trial.

    The hypervolume is that of :func:`hypervolume_history`: each objective on [0, 1] (sizes
    divided by the float model's), so it is comparable between studies of a task. Failed trials
    are 'x' markers on the bottom edge of the hypervolume panel. ``history``: that function's
    result, when the caller has it already.
    """
    if axes is None:
        references = {"size_bytes": float(float_size_bytes)} if float_size_bytes else {}
        axes = objective_axes(frame, references=references)
    if history is None:
        history = hypervolume_history(frame, axes=axes)
    fig = _new_figure(8.0, 5.0)
    ax, below = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    ax.step(
        history["number"],
        history["hypervolume"],
        where="post",
        color=_FRONT_COLOR,
        linewidth=2.0,
        label="hypervolume",
    )
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("hypervolume")
    ax.grid(True, alpha=0.3)
    failed = frame[frame["state"] == "FAIL"]["number"]
    if not failed.empty:
        ax.scatter(
            failed,
            np.full(len(failed), 0.03),
            transform=ax.get_xaxis_transform(),
            marker="x",
            color=_FAILED_COLOR,
            s=30,
            label=f"failed ({len(failed)})",
        )
    ax.legend(loc="center right", fontsize=8)
    final = history["hypervolume"].iloc[-1] if not history.empty else 0.0
    spanned = ", ".join(_axis_words(axis) for axis in axes)
    ax.set_title(f"Search progress: hypervolume of ({spanned}), final {final:.4f}", fontsize=11)

    below.step(
        history["number"],
        history["front_size"],
        where="post",
        color=_TRIAL_COLOR,
        linewidth=1.6,
        label="front size",
    )
    below.set_ylim(0, max(int(history["front_size"].max()), 1) + 1)
    below.yaxis.get_major_locator().set_params(integer=True)
    below.set_ylabel("front size")
    below.set_xlabel("trial number")
    below.xaxis.set_major_locator(MaxNLocator(integer=True))
    below.grid(True, alpha=0.3)
    return fig
