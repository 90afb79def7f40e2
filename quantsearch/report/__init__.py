"""Reports of a quantization study (plots, trials.csv, report.md) and export of a chosen trial."""

from __future__ import annotations

from quantsearch.report._errors import ExportError, ReportError
from quantsearch.report._export import (
    ExportResult,
    describe_export,
    export_trial,
    resolve_checkpoint,
    task_from_study,
)
from quantsearch.report._noise import indistinct
from quantsearch.report._onnx import Latency, OnnxReport
from quantsearch.report._plots import (
    bits_heatmap_figure,
    format_size,
    history_figure,
    hypervolume_2d,
    hypervolume_history,
    pareto_figure,
)
from quantsearch.report._sensitivity import sensitivity_heatmap_figure, sensitivity_markdown
from quantsearch.report._table import pareto_frame, trials_frame
from quantsearch.report._write import write_report

__all__ = [
    "ExportError",
    "ExportResult",
    "Latency",
    "OnnxReport",
    "ReportError",
    "bits_heatmap_figure",
    "describe_export",
    "export_trial",
    "format_size",
    "history_figure",
    "hypervolume_2d",
    "hypervolume_history",
    "indistinct",
    "pareto_figure",
    "pareto_frame",
    "resolve_checkpoint",
    "sensitivity_heatmap_figure",
    "sensitivity_markdown",
    "task_from_study",
    "trials_frame",
    "write_report",
]
