"""Where a space's files are: study names, paths relative to the space file, storage URLs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from quantsearch.pipeline import mask_url
from quantsearch.search._errors import SpaceError, shown
from quantsearch.tasks import user_task_file

__all__ = [
    "STUDY_NAME_RULE",
    "artifacts_location",
    "check_study_name",
    "cwd_resolved",
    "resolve_path",
    "storage_url",
]

# A study name names files and folders (studies/<name>.db, <name>_artifacts/, reports/<name>/):
# no separator, no leading dot (so no "." or ".."), short enough for any file system.
STUDY_NAME_RULE = (
    "1 to 100 ASCII letters, digits, '.', '_' or '-', starting with a letter or a digit "
    "(it names the study's files and folders)"
)
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_study_name(name: Any, *, key: str = "study_name", hint: str = "") -> str:
    """``name`` if it can name the study's files and folders, else SpaceError with the rule."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name):
        raise SpaceError(f"{shown(name)}{hint} is not a study name: use {STUDY_NAME_RULE}", key=key)
    return name


def cwd_resolved(key: str, value: Any) -> str | None:
    """A task ``name`` (a task file's) or ``pretrained`` path read from the working directory
    (as spaces were before their paths were relative to their file), made absolute."""
    if not isinstance(value, str):
        return None
    if key == "pretrained":
        return resolve_path(value, Path.cwd())
    task_file = user_task_file(value)
    if task_file is None:
        return None
    file, rest = task_file
    return resolve_path(file, Path.cwd()) + rest


def resolve_path(value: str, base: Path | None) -> str:
    """``value`` (``~`` expanded) joined to the folder ``base`` unless absolute, ``..`` taken
    out (``search_spaces/../studies/a.db`` is ``studies/a.db``: a ``base`` given relative to
    the working directory gives a path relative to it); unchanged when ``base`` is None."""
    if base is None:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return os.path.normpath(base / path)


def artifacts_location(value: Any, *, key: str = "--artifacts", base: Path | None = None) -> str:
    """An artifact store: ``s3://bucket[/prefix]``, or a folder (relative to ``base``, as
    :func:`resolve_path`); SpaceError naming ``key`` otherwise."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise SpaceError(
            f"{shown(value)} is not an artifact store: give a folder or s3://bucket/prefix",
            key=key,
        )
    if value.startswith("s3://"):
        if not value[len("s3://") :].split("/", 1)[0]:
            raise SpaceError(f"{shown(value)} names no bucket (s3://bucket/prefix)", key=key)
        return value
    if "://" in value:
        raise SpaceError(
            f"{shown(value)} is not an artifact store: give a folder or s3://bucket/prefix "
            "(no other scheme is supported)",
            key=key,
        )
    return resolve_path(value, base)


def storage_url(value: Any, *, key: str = "--storage", base: Path | None = None) -> str:
    """A storage URL from a SQLite file path or a database URL (SpaceError naming ``key``).

    ``base``: the folder a relative SQLite file (a path, or a ``sqlite:///`` URL) is in, for a
    storage written in a space file; None: the working directory (left relative).
    """
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        shown_value = shown(mask_url(value)) if isinstance(value, str) else shown(value)
        raise SpaceError(
            f"{shown_value} is not a storage: give a SQLite file path or a database URL "
            "(sqlite:///path.db, postgresql://...)",
            key=key,
        )
    if "://" not in value:
        path = Path(value).expanduser()
        url = f"sqlite:///{resolve_path(str(path), base)}"
    else:
        url = value
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SpaceError(
            f"{shown(mask_url(value))} is not a database URL (sqlite:///path.db, "
            "postgresql://user@host/db)",
            key=key,
        ) from None
    database = parsed.database
    if (
        base is not None
        and "://" in value
        and parsed.drivername.startswith("sqlite")
        and database
        and database != ":memory:"
        and not database.startswith("file:")  # an SQLite URI filename: left as given
        and not Path(database).is_absolute()
    ):
        url = f"{value[: value.index('://')]}:///{os.path.normpath(base / database)}"
        if parsed.query:
            url += "?" + value.partition("?")[2]
    return url
