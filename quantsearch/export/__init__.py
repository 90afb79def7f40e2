"""Export of a finished trial: its model rebuilt from the stored checkpoint, written, reloaded
and checked against the accuracy the study stored.

    result = export_trial(study, 12, "exports/trial_12", format="onnx")
    print(describe_export(result))

Formats are a registry (:data:`EXPORT_FORMATS`): :func:`register_export_format` adds one, and
``quantsearch export --format NAME`` offers it.
"""

from __future__ import annotations

from quantsearch.export._checkpoint import resolve_checkpoint
from quantsearch.export._errors import ExportError
from quantsearch.export._export import (
    ExportResult,
    dequantized_state,
    describe_export,
    export_trial,
    task_from_study,
)
from quantsearch.export._formats import (
    DEFAULT_FORMAT,
    EXPORT_FORMATS,
    ExportContext,
    ExportFormat,
    ExportHandler,
    ExportPart,
    describe_formats,
    get_export_format,
    register_export_format,
)
from quantsearch.export._onnx import Latency, OnnxReport, describe_onnx, export_onnx_files

__all__ = [
    "DEFAULT_FORMAT",
    "EXPORT_FORMATS",
    "ExportContext",
    "ExportError",
    "ExportFormat",
    "ExportHandler",
    "ExportPart",
    "ExportResult",
    "Latency",
    "OnnxReport",
    "dequantized_state",
    "describe_export",
    "describe_formats",
    "describe_onnx",
    "export_onnx_files",
    "export_trial",
    "get_export_format",
    "register_export_format",
    "resolve_checkpoint",
    "task_from_study",
]
