"""Output folders checked before any work: a folder that cannot be written fails now, not later."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FolderError", "check_writable_folder", "replacing"]


class FolderError(ValueError):
    """An output folder that cannot be created or written."""


def check_writable_folder(folder: Path, label: str) -> None:
    """Refuse (FolderError) ``folder`` unless it is, or can be created as, a writable folder.

    Nothing is created: the nearest existing ancestor must be a folder this process may write.
    ``label`` names the folder in the message (``--report-dir``, ``the artifacts folder``).
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise FolderError(f"{label} {folder}: {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f"cannot be created: {existing} "
        raise FolderError(f"{label} {folder}: {where}is not writable")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` only once complete.

    A process killed while writing leaves the old file (or none), never a truncated one.
    """
    # Created with open(), not mkstemp: the file gets the umask's mode like any other output.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    temporary.open("x").close()
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
