"""The report's data, computed once: the trials frame, the front, the objectives' axes, the
hypervolume history and the study record. Every file of the report is drawn from it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from itertools import combinations

import optuna
import pandas as pd

from quantsearch.pipeline import MetricInfo, Sensitivity, StudyRecord, mask_url, storage_url
from quantsearch.report._objectives import (
    Axis,
    float_references,
    float_size_of,
    hypervolume_history,
    objective_axes,
)
from quantsearch.report._table import check_reportable, pareto_frame, trials_frame

__all__ = [
    "BITS_IMAGE",
    "HISTORY_IMAGE",
    "PARETO_SVG",
    "REPORT_FILE",
    "SENSITIVITY_IMAGE",
    "TRIALS_CSV",
    "ParetoPlot",
    "ReportData",
    "default_study_args",
]

REPORT_FILE = "report.md"
TRIALS_CSV = "trials.csv"
PARETO_SVG = "pareto.svg"
BITS_IMAGE = "bits.png"
HISTORY_IMAGE = "history.png"
SENSITIVITY_IMAGE = "sensitivity.png"


def default_study_args(study: optuna.Study) -> str:
    """Command-line arguments that open ``study`` again: ``--storage URL --study NAME``."""
    url = storage_url(study)
    storage = f"--storage {shlex.quote(mask_url(url))} " if url else ""
    return f"{storage}--study {shlex.quote(study.study_name)}"


@dataclass(frozen=True)
class ParetoPlot:
    """One pair of objectives drawn against each other, and its file."""

    x: Axis
    y: Axis
    stem: str
    """``pareto`` for the leading pair (which also gets an SVG), ``pareto_<y>_<x>`` after."""

    @property
    def title(self) -> str:
        """E.g. ``validation accuracy against model size``."""
        return f"{self.y.label} against {self.x.label}"

    @property
    def image(self) -> str:
        """The PNG file in the report's folder."""
        return f"{self.stem}.png"


def _plot_pairs(axes: tuple[Axis, ...]) -> list[tuple[Axis, Axis]]:
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


@dataclass(frozen=True)
class ReportData:
    """Everything report.md and the plots show, read and computed once (:meth:`of`)."""

    study_name: str
    record: StudyRecord
    frame: pd.DataFrame
    """One row per trial (:func:`~quantsearch.report.trials_frame`)."""
    front: pd.DataFrame
    """The front's rows by size (:func:`~quantsearch.report.pareto_frame`)."""
    axes: tuple[Axis, ...]
    """The study's objectives, in its order."""
    history: pd.DataFrame
    """The hypervolume and front size after each trial."""
    float_size_bytes: float
    pareto_plots: tuple[ParetoPlot, ...]
    study_args: str
    """The arguments that name the study on the command line."""
    command: str | None
    """The command line that wrote the report, if given."""
    quality: Axis | None = None
    """The metric the tables show first: the first objective that is not relative to the
    float model (size, bitops); accuracy for a study without one."""

    @classmethod
    def of(
        cls, study: optuna.Study, *, command: str | None = None, study_args: str | None = None
    ) -> ReportData:
        """Read ``study`` once; ReportError if it has no completed trial to report on."""
        args = study_args or default_study_args(study)
        record = StudyRecord.of(study)
        frame = trials_frame(study, record=record)
        check_reportable(study.study_name, frame, rerun_hint=f"quantsearch study {args}")
        axes = tuple(
            objective_axes(
                frame,
                metric_names=study.metric_names,
                references=float_references(record),
                metrics=record.metrics,
            )
        )
        quality = next((a for a in axes if not a.relative), None) or objective_axes(
            frame, metric_names=["accuracy"]
        )[0]
        plots = tuple(
            ParetoPlot(x, y, "pareto" if index == 0 else f"pareto_{y.name}_{x.name}")
            for index, (x, y) in enumerate(_plot_pairs(axes))
        )
        return cls(
            study_name=study.study_name,
            record=record,
            frame=frame,
            front=pareto_frame(frame),
            axes=axes,
            history=hypervolume_history(frame, axes=axes),
            float_size_bytes=float_size_of(frame, record.float_size_bytes),
            pareto_plots=plots,
            study_args=args,
            command=command,
            quality=quality,
        )

    @property
    def quality_metric(self) -> Axis:
        """The quality metric's axis (see ``quality``)."""
        assert self.quality is not None
        return self.quality

    @property
    def metric_infos(self) -> dict[str, MetricInfo]:
        """What the study stored about its metrics."""
        return dict(self.record.metrics)

    @property
    def hypervolume(self) -> float:
        """The final hypervolume of the front."""
        return float(self.history["hypervolume"].iloc[-1])

    @property
    def sensitivity(self) -> Sensitivity | None:
        """The study's measured sensitivity, when it has any parameter to show."""
        sensitivity = self.record.sensitivity
        return sensitivity if sensitivity is not None and sensitivity.params else None
