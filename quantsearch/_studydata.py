"""Facts about a stored study that the search and the reports both read."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from quantsearch.pipeline import TrialRecord

__all__ = ["layer_order", "sqlite_path"]


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
