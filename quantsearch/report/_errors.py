"""Errors raised by the report and export code."""

from __future__ import annotations

__all__ = ["ExportError", "ReportError"]


class ReportError(ValueError):
    """A study cannot be reported on (empty, nothing completed, missing attributes)."""


class ExportError(ReportError):
    """A trial cannot be exported, or its reloaded export does not reproduce the stored accuracy."""
