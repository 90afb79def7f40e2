"""The report's lead when the study has a target: the smallest trial within the drop."""

from __future__ import annotations

import math

import pandas as pd

from quantsearch._units import format_size
from quantsearch.pipeline import MetricInfo, TargetState

__all__ = ["target_markdown", "target_row"]


def target_row(frame: pd.DataFrame, target: TargetState) -> pd.Series | None:
    """The smallest complete trial within the target's bound (None if none)."""
    complete = frame[(frame["state"] == "COMPLETE") & frame["feasible"]]
    column = target.metric
    if column not in complete:
        return None
    maximize = target.direction == "maximize"
    within = complete[column] >= target.min_accuracy if maximize else (
        complete[column] <= target.min_accuracy
    )
    fitting = complete[within]
    if fitting.empty:
        return None
    return fitting.sort_values(["size_bytes", column], ascending=[True, not maximize]).iloc[0]


def _metric_markdown(frame: pd.DataFrame, target: TargetState, info: MetricInfo) -> list[str]:
    sign = ">=" if target.direction == "maximize" else "<="
    if math.isnan(target.max_accuracy_drop):
        how = f"{info.format(target.min_accuracy)}"
    else:
        change = (
            f"{target.max_accuracy_drop:.2%} of" if target.relative
            else f"{info.format(target.max_accuracy_drop)} of"
        )
        how = (
            f"{info.format(target.min_accuracy)}, within {change} the float model's "
            f"{info.format(target.float_accuracy)}"
        )
    head = f"Smallest model with validation {target.metric} {sign} {how}"
    row = target_row(frame, target)
    if row is None:
        return ["## Target", "", f"{head}: no trial reaches it yet.", ""]
    test = row.get(f"test_{target.metric}")
    return [
        "## Target",
        "",
        f"{head}: **trial {int(row['number'])}**, {format_size(row['size_bytes'])} "
        f"({row['compression_ratio']:.2f}× smaller than float) at "
        f"{info.format(row[target.metric])} validation and {info.format(test)} test "
        f"{target.metric}; {_bound(row, target)}.",
        "",
    ]


def _bound(row: pd.Series, target: TargetState) -> str:
    smallest = target.smallest_bytes
    return (
        "the smallest size the space allows, so the study stopped there"
        if row["size_bytes"] <= smallest
        else f"the space's smallest config would be {format_size(smallest)}"
    )


def target_markdown(
    frame: pd.DataFrame, target: TargetState, info: MetricInfo | None = None
) -> list[str]:
    """The section report.md opens with: which trial meets the target, or that none does."""
    if target.metric != "accuracy":
        shown = info or MetricInfo(name=target.metric, direction=target.direction)  # type: ignore[arg-type]
        return _metric_markdown(frame, target, shown)
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
