"""Where a study lives: its storage URL, its SQLite file, its artifacts folder and their files.

Computed once (:meth:`StudyLocation.of`) and passed around, so the layout is written here only.
Every output of a storage URL goes through :func:`mask_url`: a password is never printed or
stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

__all__ = [
    "FLOAT_MODEL_FILE",
    "StudyLocation",
    "mask_text",
    "mask_url",
    "sqlite_path",
    "storage_url",
]

#: The float model's state dict, in the study's artifacts folder.
FLOAT_MODEL_FILE = "float_model.pt"
_LOCK_FILE = "study.lock"

MASK = "***"
# user:password@ in whatever follows a scheme, for text sqlalchemy cannot parse.
_USERINFO = re.compile(r"(://[^:/@\s]*):[^/\s]*@")
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|pwd)=)[^&\s]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its password (``user:pw@`` or ``?password=``) shown as ``***``."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return mask_text(url)
    # sqlalchemy's rendering, then the pattern too: an unescaped "@" in a password splits it.
    return mask_text(parsed.render_as_string(hide_password=True) if parsed.password else url)


def mask_text(text: str) -> str:
    """``text`` (a message, a command line) with the password of every URL in it masked."""
    return _QUERY_SECRET.sub(rf"\1{MASK}", _USERINFO.sub(rf"\1:{MASK}@", text))


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, or None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def storage_url(study: optuna.Study) -> str | None:
    """The RDB URL of ``study``'s storage, or None for in-memory and other storages."""
    storage = study._storage
    # RDB storages come wrapped in optuna's cache layer.
    backend = getattr(storage, "_backend", storage)
    url = getattr(backend, "url", None)
    return str(url) if isinstance(url, str) else None


@dataclass(frozen=True)
class StudyLocation:
    """A study's storage and the folder of its files (float model, checkpoints, lock).

    Beside a SQLite file the folder is ``<db stem>_artifacts/<study name>/`` and stored paths
    are relative to the file's folder (``root``), so the pair can be moved together. With a
    shared database it is ``./studies/<study name>_artifacts/`` on each machine, and stored
    paths are absolute.
    """

    storage: str
    study_name: str
    database: Path | None
    """The SQLite file, or None for a shared (server) database."""
    root: Path
    folder: Path

    @classmethod
    def of(cls, storage: str, study_name: str) -> StudyLocation:
        """The location of study ``study_name`` in ``storage``; the name must already be a
        checked study name (it becomes a path component)."""
        database = sqlite_path(storage)
        if database is not None:
            root = database.parent
            folder = root / f"{database.stem}_artifacts" / study_name
            return cls(storage, study_name, database, root, folder)
        folder = (Path("studies") / f"{study_name}_artifacts").resolve()
        return cls(storage, study_name, None, folder, folder)

    @property
    def shared(self) -> bool:
        """Whether other machines may write the study too (a database server, not a file)."""
        return self.database is None

    @property
    def float_model(self) -> Path:
        return self.folder / FLOAT_MODEL_FILE

    @property
    def lock(self) -> Path:
        """The lock file held by the one process that runs a SQLite study."""
        return self.folder / _LOCK_FILE

    @property
    def shown(self) -> str:
        """The storage URL with its password masked."""
        return mask_url(self.storage)

    def checkpoint(self, number: int) -> Path:
        """The checkpoint file of trial ``number``."""
        return self.folder / f"trial_{number}.pt"

    def stored(self, path: Path) -> str:
        """``path`` as a study attribute stores it: relative to ``root`` beside a SQLite file."""
        return str(path if self.shared else path.relative_to(self.root))
