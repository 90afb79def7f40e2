"""write_report: every file of a study's report in one folder."""

from __future__ import annotations

import shlex
from itertools import combinations
from pathlib import Path

import optuna
import pandas as pd

from quantsearch._paths import replacing
from quantsearch._studydata import mask_url
from quantsearch.pipeline import sensitivity_of
from quantsearch.report._markdown import ReportContext, render_markdown
from quantsearch.report._noise import noise_markdown
from quantsearch.report._objectives import Axis, objective_axes, study_axes
from quantsearch.report._plots import (
    bits_heatmap_figure,
    float_size_of,
    history_figure,
    hypervolume_history,
    pareto_figure,
    save_figure,
)
from quantsearch.report._sensitivity import sensitivity_heatmap_figure, sensitivity_markdown
from quantsearch.report._storage import storage_url
from quantsearch.report._table import check_reportable, pareto_frame, trials_frame
from quantsearch.report._target import target_markdown

__all__ = ["default_study_args", "write_report"]


def default_study_args(study: optuna.Study) -> str:
    """Command-line arguments that open ``study`` again: ``--storage URL --study NAME``."""
    url = storage_url(study)
    storage = f"--storage {shlex.quote(mask_url(url))} " if url else ""
    return f"{storage}--study {shlex.quote(study.study_name)}"


def _plot_pairs(axes: list[Axis]) -> list[tuple[Axis, Axis]]:
    """(x, y) for each pair of objectives: accuracy-like (maximised) metrics go on y, and the
    pair with the accuracy and the size comes first."""
    pairs = []
    for first, second in combinations(axes, 2):
        x, y = (first, second) if second.maximize and not first.maximize else (second, first)
        pairs.append((x, y))
    if not pairs:
        size, accuracy = objective_axes(pd.DataFrame(), metric_names=["size_bytes", "accuracy"])
        return [(size, accuracy)]
    return sorted(pairs, key=lambda pair: (pair[0].name != "size_bytes", not pair[1].maximize))


def write_report(
    study: optuna.Study,
    out_dir: str | Path,
    *,
    command: str | None = None,
    study_args: str | None = None,
) -> Path:
    """Write the report of ``study`` into ``out_dir`` and return the path of its report.md.

    Files: ``pareto.png`` / ``pareto.svg`` (accuracy against size; a study of three objectives
    gets one ``pareto_<y>_<x>.png`` for each further pair), ``bits.png`` (per-layer bits
    of the front), ``history.png`` (hypervolume and front size by trial), ``trials.csv`` (one row
    per trial, see :func:`trials_frame`), ``sensitivity.png`` (when the study measured its
    sensitivity) and ``report.md``. ``command`` is the command line that
    produced the report (quoted in report.md); ``study_args`` the arguments that name the study
    on the command line (e.g. ``--space search_spaces/digits.yaml``), used in the export example;
    by default ``--storage URL --study NAME``.

    Raises :class:`ReportError` if the study has no trial or no completed trial.
    """
    args = study_args or default_study_args(study)
    frame = trials_frame(study)
    check_reportable(study.study_name, frame, rerun_hint=f"quantsearch study {args}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    attrs = study.user_attrs
    axes = study_axes(study, frame)
    front = pareto_frame(frame)

    images: dict[str, str] = {}
    plots: list[tuple[str, str]] = []
    for index, (x, y) in enumerate(_plot_pairs(axes)):
        stem = "pareto" if index == 0 else f"pareto_{y.name}_{x.name}"
        title = f"{y.label} against {x.label}"
        figure = pareto_figure(frame, x=x, y=y, title=f"{study.study_name}: {title}")
        save_figure(figure, out / f"{stem}.png")
        images[stem] = f"{stem}.png"
        plots.append((title, f"{stem}.png"))
        if index == 0:
            save_figure(figure, out / "pareto.svg")
            images["pareto_svg"] = "pareto.svg"
    save_figure(bits_heatmap_figure(frame, layers=attrs.get("layers")), out / "bits.png")
    history = hypervolume_history(frame, axes=axes)
    save_figure(history_figure(frame, axes=axes, history=history), out / "history.png")
    images.update(bits="bits.png", history="history.png")
    with replacing(out / "trials.csv") as temporary:
        frame.to_csv(temporary, index=False)

    context = ReportContext(
        study_name=study.study_name,
        study_attrs=attrs,
        study_args=args,
        command=command,
        hypervolume=float(history["hypervolume"].iloc[-1]),
        float_size_bytes=float_size_of(frame, attrs.get("float_size_bytes")),
        axes=tuple(axes),
        images=images,
        pareto_plots=tuple(plots),
    )
    text = render_markdown(frame, front, context)
    if isinstance(attrs.get("target"), dict) and "## Summary" in text:
        lead = "\n".join(target_markdown(frame, attrs["target"]))
        text = text.replace("## Summary", f"{lead}\n## Summary", 1)
    if not front.empty and "## Bit widths on the front" in text:
        noise = "\n".join(noise_markdown(front))
        text = text.replace("## Bit widths on the front", f"{noise}\n## Bit widths on the front", 1)
    sensitivity = sensitivity_of(study)
    if sensitivity is not None and sensitivity.params:
        save_figure(sensitivity_heatmap_figure(sensitivity), out / "sensitivity.png")
        text = (
            text.rstrip("\n")
            + "\n\n"
            + "\n".join(sensitivity_markdown(sensitivity, "sensitivity.png"))
        )
    report = out / "report.md"
    with replacing(report) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return report
