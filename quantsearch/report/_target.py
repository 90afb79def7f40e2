"""The report's lead when the study has a target: the smallest trial within the drop."""

from __future__ import annotations

import pandas as pd

from quantsearch._units import format_size
from quantsearch.pipeline import TargetState

__all__ = ["target_markdown", "target_row"]


def target_row(frame: pd.DataFrame, target: TargetState) -> pd.Series | None:
    """The smallest complete trial at or above the target's accuracy floor (None if none)."""
    complete = frame[(frame["state"] == "COMPLETE") & frame["feasible"]]
    fitting = complete[complete["accuracy"] >= target.min_accuracy]
    if fitting.empty:
        return None
    return fitting.sort_values(["size_bytes", "accuracy"], ascending=[True, False]).iloc[0]


def target_markdown(frame: pd.DataFrame, target: TargetState) -> list[str]:
    """The section report.md opens with: which trial meets the target, or that none does."""
    drop, floor = target.max_accuracy_drop, target.min_accuracy
    head = (
        f"Smallest model within {drop * 100:.2f} points of the float model's validation "
        f"accuracy ({target.float_accuracy:.2%}; floor {floor:.2%})"
    )
    row = target_row(frame, target)
    if row is None:
        return ["## Target", "", f"{head}: no trial reaches it yet.", ""]
    ratio = row["compression_ratio"]
    smallest = target.smallest_bytes
    bound = (
        "the smallest size the space allows, so the study stopped there"
        if row["size_bytes"] <= smallest
        else f"the space's smallest config would be {format_size(smallest)}"
    )
    return [
        "## Target",
        "",
        f"{head}: **trial {int(row['number'])}**, {format_size(row['size_bytes'])} "
        f"({ratio:.2f}× smaller than float) at {row['accuracy']:.2%} validation and "
        f"{row['test_accuracy']:.2%} test accuracy; {bound}.",
        "",
    ]
