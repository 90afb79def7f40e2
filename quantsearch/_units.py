"""Human-readable units shared by the terminal output and the reports."""

from __future__ import annotations

import math

__all__ = ["format_count", "format_size"]


def format_size(num_bytes: float, _position: float | None = None) -> str:
    """Bytes with decimal units: ``950 B``, ``12.2 KB``, ``1.5 MB`` ('-' when unknown).

    The unused second argument lets matplotlib's ``FuncFormatter`` call it for tick labels.
    """
    if num_bytes is None or not math.isfinite(num_bytes):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.3g} B"


def format_count(value: float | None, _position: float | None = None) -> str:
    """A large count with SI suffixes: ``9.6k``, ``3.2M``, ``1.1G`` ('-' when unknown)."""
    if value is None or not math.isfinite(value):
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"
