"""Reports of a quantization study: plots, trials.csv and report.md, drawn from one
:class:`ReportData` read once from the study. (Exporting a trial: :mod:`quantsearch.export`.)"""

from __future__ import annotations

from quantsearch.report._data import ParetoPlot, ReportData
from quantsearch.report._errors import ReportError
from quantsearch.report._latency import PredictionError, latency_pairs, prediction_error
from quantsearch.report._markdown import SECTIONS, render_markdown
from quantsearch.report._noise import indistinct
from quantsearch.report._objectives import hypervolume_2d, hypervolume_history
from quantsearch.report._plots import (
    bits_heatmap_figure,
    format_size,
    history_figure,
    pareto_figure,
)
from quantsearch.report._sensitivity import sensitivity_heatmap_figure, sensitivity_markdown
from quantsearch.report._table import pareto_frame, trials_frame
from quantsearch.report._write import write_report

__all__ = [
    "SECTIONS",
    "ParetoPlot",
    "PredictionError",
    "ReportData",
    "ReportError",
    "bits_heatmap_figure",
    "format_size",
    "history_figure",
    "hypervolume_2d",
    "hypervolume_history",
    "indistinct",
    "latency_pairs",
    "pareto_figure",
    "pareto_frame",
    "prediction_error",
    "render_markdown",
    "sensitivity_heatmap_figure",
    "sensitivity_markdown",
    "trials_frame",
    "write_report",
]
