"""Which front trials the test split cannot tell apart from a smaller one."""

from __future__ import annotations

import math

import pandas as pd

from quantsearch._units import format_size

__all__ = ["indistinct", "noise_markdown"]


def indistinct(front: pd.DataFrame) -> dict[int, int]:
    """Front trial -> the smallest smaller front trial whose test-accuracy 95% interval
    overlaps its own: the larger model's extra accuracy is within the split's noise."""
    rows = front.sort_values(["size_bytes", "number"], kind="stable")
    marks: dict[int, int] = {}
    seen: list[tuple[int, float, float]] = []
    for row in rows.itertuples():
        low, high = float(row.test_low), float(row.test_high)
        if not (math.isfinite(low) and math.isfinite(high)):
            continue
        for number, other_low, other_high in seen:
            if low <= other_high and other_low <= high:
                marks[int(row.number)] = number
                break
        seen.append((int(row.number), low, high))
    return marks


def noise_markdown(front: pd.DataFrame) -> list[str]:
    """The report.md section after the front: each not distinguishable trial and why."""
    marks = indistinct(front)
    out = [
        "## Noise on the front",
        "",
        "A front trial is *not distinguishable* from a smaller front trial when their 95% "
        "test-accuracy intervals overlap: the test split cannot tell that its extra size buys "
        "accuracy.",
        "",
    ]
    if not marks:
        return [*out, "Every front trial is distinguishable from the smaller ones.", ""]
    by_number = {int(r.number): r for r in front.itertuples()}
    out += [
        "| trial | size | test accuracy | not distinguishable from | its size "
        "| its test accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for number, other in marks.items():
        row, small = by_number[number], by_number[other]
        out.append(
            f"| {number} | {format_size(row.size_bytes)} | {_interval(row)} | {other} "
            f"| {format_size(small.size_bytes)} | {_interval(small)} |"
        )
    return [*out, ""]


def _interval(row: object) -> str:
    accuracy = float(row.test_accuracy)  # type: ignore[attr-defined]
    low, high = float(row.test_low), float(row.test_high)  # type: ignore[attr-defined]
    return f"{accuracy:.2%} [{low:.2%}, {high:.2%}]"
