"""write_report: every file of a study's report in one folder."""

from __future__ import annotations

import shlex
from pathlib import Path

import optuna

from quantsearch._paths import replacing
from quantsearch._studydata import mask_url
from quantsearch.report._markdown import ReportContext, render_markdown
from quantsearch.report._plots import (
    bits_heatmap_figure,
    float_size_of,
    history_figure,
    hypervolume_history,
    pareto_figure,
    save_figure,
)
from quantsearch.report._storage import storage_url
from quantsearch.report._table import check_reportable, pareto_frame, trials_frame

__all__ = ["default_study_args", "write_report"]


def default_study_args(study: optuna.Study) -> str:
    """Command-line arguments that open ``study`` again: ``--storage URL --study NAME``."""
    url = storage_url(study)
    storage = f"--storage {shlex.quote(mask_url(url))} " if url else ""
    return f"{storage}--study {shlex.quote(study.study_name)}"


def write_report(
    study: optuna.Study,
    out_dir: str | Path,
    *,
    command: str | None = None,
    study_args: str | None = None,
) -> Path:
    """Write the report of ``study`` into ``out_dir`` and return the path of its report.md.

    Files: ``pareto.png`` / ``pareto.svg`` (accuracy against size), ``bits.png`` (per-layer bits
    of the front), ``history.png`` (hypervolume and front size by trial), ``trials.csv`` (one row
    per trial, see :func:`trials_frame`) and ``report.md``. ``command`` is the command line that
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
    float_size = float_size_of(frame, attrs.get("float_size_bytes"))
    front = pareto_frame(frame)

    figure = pareto_figure(frame, title=f"{study.study_name}: validation accuracy against size")
    save_figure(figure, out / "pareto.png")
    save_figure(figure, out / "pareto.svg")
    save_figure(bits_heatmap_figure(frame, layers=attrs.get("layers")), out / "bits.png")
    save_figure(history_figure(frame, float_size_bytes=float_size), out / "history.png")
    with replacing(out / "trials.csv") as temporary:
        frame.to_csv(temporary, index=False)

    history = hypervolume_history(frame, float_size_bytes=float_size)
    context = ReportContext(
        study_name=study.study_name,
        study_attrs=attrs,
        metric_names=study.metric_names,
        study_args=args,
        command=command,
        hypervolume=float(history["hypervolume"].iloc[-1]),
        float_size_bytes=float_size,
        images={
            "pareto": "pareto.png",
            "pareto_svg": "pareto.svg",
            "bits": "bits.png",
            "history": "history.png",
        },
    )
    report = out / "report.md"
    with replacing(report) as temporary:
        temporary.write_text(render_markdown(frame, front, context), encoding="utf-8")
    return report
