"""The error raised by the report code."""

from __future__ import annotations

__all__ = ["ReportError"]


class ReportError(ValueError):
    """A study cannot be reported on (empty, nothing completed, missing attributes)."""
