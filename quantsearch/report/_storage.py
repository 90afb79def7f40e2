"""Where a study lives on disk: its storage URL and the folder its checkpoints are relative to."""

from __future__ import annotations

from pathlib import Path

import optuna

from quantsearch._studydata import sqlite_path

__all__ = ["sqlite_folder", "storage_url"]


def storage_url(study: optuna.Study) -> str | None:
    """The RDB URL of ``study``'s storage, or None for in-memory and other storages."""
    storage = study._storage
    # RDB storages come wrapped in optuna's cache layer.
    backend = getattr(storage, "_backend", storage)
    url = getattr(backend, "url", None)
    return str(url) if isinstance(url, str) else None


def sqlite_folder(url: str | None) -> Path | None:
    """The folder holding the SQLite file of ``url`` (``sqlite:///path/to.db``), else None."""
    path = sqlite_path(url) if url else None
    return path.parent if path is not None else None

