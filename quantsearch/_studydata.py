"""Facts about a stored study that the search and the reports both read."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from quantsearch.pipeline import TrialRecord

__all__ = ["layer_order", "mask_text", "mask_url", "sqlite_path"]

MASK = "***"
# user:password@ in whatever follows a scheme, for text sqlalchemy cannot parse.
_USERINFO = re.compile(r"(://[^:/@\s]*):[^/\s]*@")
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|pwd)=)[^&\s]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its password (``user:pw@`` or ``?password=``) shown as ``***``.

    Every output of a storage URL (banner, messages, report, stored attributes) goes through
    this, so a password given on the command line is never printed or stored.
    """
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


def layer_order(study_layers: Sequence[str] | None, trials: Iterable[FrozenTrial]) -> list[str]:
    """Layers in model order (the study's "layers" attribute), then any others as first seen."""
    order: list[str] = list(study_layers or [])
    seen = set(order)
    for trial in trials:
        for layer in TrialRecord.of(trial).layer_bits:
            if layer not in seen:
                seen.add(layer)
                order.append(layer)
    return order
