"""write_report: every file of a study's report in one folder, from one :class:`ReportData`."""

from __future__ import annotations

from pathlib import Path

import optuna

from quantsearch._paths import replacing
from quantsearch.report._data import (
    BITS_IMAGE,
    HISTORY_IMAGE,
    PARETO_SVG,
    REPORT_FILE,
    SENSITIVITY_IMAGE,
    TRIALS_CSV,
    ReportData,
    default_study_args,
)
from quantsearch.report._markdown import render_markdown
from quantsearch.report._plots import (
    bits_heatmap_figure,
    history_figure,
    pareto_figure,
    save_figure,
)
from quantsearch.report._sensitivity import sensitivity_heatmap_figure

__all__ = ["default_study_args", "write_report"]


def _write_plots(data: ReportData, out: Path) -> None:
    for index, plot in enumerate(data.pareto_plots):
        figure = pareto_figure(
            data.frame, x=plot.x, y=plot.y, title=f"{data.study_name}: {plot.title}"
        )
        save_figure(figure, out / plot.image)
        if index == 0:
            save_figure(figure, out / PARETO_SVG)
    quality = data.quality if data.quality and data.quality.name != "accuracy" else None
    bits = bits_heatmap_figure(
        data.frame, layers=data.record.layers, front=data.front, quality=quality
    )
    save_figure(bits, out / BITS_IMAGE)
    history = history_figure(data.frame, axes=data.axes, history=data.history)
    save_figure(history, out / HISTORY_IMAGE)
    if data.sensitivity is not None:
        save_figure(sensitivity_heatmap_figure(data.sensitivity), out / SENSITIVITY_IMAGE)


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
    data = ReportData.of(study, command=command, study_args=study_args)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_plots(data, out)
    with replacing(out / TRIALS_CSV) as temporary:
        data.frame.to_csv(temporary, index=False)
    report = out / REPORT_FILE
    with replacing(report) as temporary:
        temporary.write_text(render_markdown(data), encoding="utf-8")
    return report
