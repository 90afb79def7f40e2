"""The report's sensitivity section: a heatmap (parameter x bits) and the table in report.md."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure

from quantsearch.pipeline import Bits, Sensitivity, SensitivityEntry
from quantsearch.report._plots import _new_figure

__all__ = ["sensitivity_columns", "sensitivity_heatmap_figure", "sensitivity_markdown"]


def sensitivity_columns(sensitivity: Sensitivity) -> list[Bits]:
    """Every bit width any parameter offers, in the order the space lists them."""
    return list(dict.fromkeys(b for values in sensitivity.candidates.values() for b in values))


def _matrix(sensitivity: Sensitivity, columns: list[Bits]) -> np.ndarray:
    values = np.full((len(sensitivity.params), len(columns)), np.nan)
    for i, param in enumerate(sensitivity.params):
        for j, bits in enumerate(columns):
            entry = param.entry(bits)
            if entry is not None:
                values[i, j] = entry.loss - sensitivity.float_loss
    return values


def sensitivity_heatmap_figure(sensitivity: Sensitivity) -> Figure:
    """Validation loss increase of each parameter (rows) alone at each bit width (columns).

    ``fig.axes[0].images[0].get_array()`` holds the increases, masked where not offered.
    """
    columns = sensitivity_columns(sensitivity)
    values = _matrix(sensitivity, columns)
    rows = [f"{p.param} ({', '.join(p.tensors)})" for p in sensitivity.params]
    fig = _new_figure(min(16.0, 3.5 + 0.9 * len(columns)), min(24.0, 1.6 + 0.34 * len(rows)))
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    # Increases span decades (2 bits against 8); a symmetric log scale keeps both readable.
    linear = max(top * 1e-3, 1e-6)
    norm = SymLogNorm(linthresh=linear, vmin=-top, vmax=top)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#e4e4e4")
    image = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=cmap,
        norm=norm,
        aspect="auto",
        interpolation="nearest",
    )
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            strong = abs(norm(value) - 0.5) > 0.35
            ax.text(
                j,
                i,
                f"{value:+.3g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if strong else "black",
            )
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlabel("bits (this parameter alone quantized; everything else float)")
    ax.set_title(
        f"Sensitivity: validation loss increase over float ({sensitivity.samples} examples)"
    )
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("loss increase")
    return fig


def _cell_metric(sensitivity: Sensitivity, entry: SensitivityEntry) -> str:
    """The metric part of a cell: a proportion's drop in points, another's change."""
    info = sensitivity.metric_info
    if info is None:
        return ""
    if not sensitivity.by_drop:
        return f" / {sensitivity.shown(entry.metric)}"
    drop = sensitivity.drop(entry)
    return f" / {drop * 100:+.2f}" if info.proportion else f" / {drop:+.4g}"


def sensitivity_markdown(sensitivity: Sensitivity, image: str | None) -> list[str]:
    """The report.md section: what was measured, the heatmap, and the table."""
    columns = sensitivity_columns(sensitivity)
    info = sensitivity.metric_info
    if info is None:
        measured, metric_part = "", ""
    else:
        measured = f", {info.name} {sensitivity.shown(sensitivity.float_metric)}"
        points = " in points" if info.proportion and sensitivity.by_drop else ""
        metric_part = f" / {sensitivity.drop_label}{points}"
    out = [
        "## Sensitivity",
        "",
        f"Measured once on the float model before the search ({sensitivity.method}; "
        f"{sensitivity.samples} validation examples, float {sensitivity.loss_label} "
        f"{sensitivity.float_loss:.4f}{measured}; {sensitivity.seconds:.1f} s): each "
        "per-layer parameter alone at each bit width, post-training. Each cell: "
        f"{sensitivity.loss_label} increase{metric_part} / size change in bytes"
        + (
            " / Hessian measure (mean trace x ||Q(W) - W||^2)"
            if sensitivity.method == "hessian"
            else ""
        )
        + ". Trials marked `seed_of: sensitivity` came from its predicted Pareto set.",
        "",
    ]
    if image is not None:
        out += [f"![Loss increase per layer and bit width]({image})", ""]
    out.append(
        "| parameter | tensors | "
        + " | ".join(f"{c} bits" if c != "float" else c for c in columns)
        + " |"
    )
    out.append("|---|---|" + "---:|" * len(columns))
    for param in sensitivity.params:
        cells = []
        for bits in columns:
            entry = param.entry(bits)
            if entry is None:
                cells.append("–")
                continue
            cell = (
                f"{entry.loss - sensitivity.float_loss:+.4f}"
                f"{_cell_metric(sensitivity, entry)} / {entry.size_delta:+,}"
            )
            if entry.hessian is not None:
                cell += f" / {entry.hessian:.3g}"
            cells.append(cell)
        out.append(f"| `{param.param}` | {', '.join(param.tensors)} | " + " | ".join(cells) + " |")
    out.append("")
    return out
