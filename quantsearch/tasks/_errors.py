"""The tasks package's error type."""

from __future__ import annotations

__all__ = ["TaskError"]


class TaskError(ValueError):
    """A task cannot be built: unknown name, bad option, missing or malformed data files."""
