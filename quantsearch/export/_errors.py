"""The error of the export package."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(ValueError):
    """A trial cannot be exported, or its reloaded export does not reproduce the stored accuracy."""
