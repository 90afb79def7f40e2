"""A study's objectives as plot axes, the hypervolume they span, and its history."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from quantsearch.pipeline import METRICS, MetricInfo, StudyRecord, front_mask

__all__ = [
    "DEFAULT_OBJECTIVES",
    "Axis",
    "float_references",
    "float_size_of",
    "front_mask",
    "hypervolume",
    "hypervolume_2d",
    "hypervolume_history",
    "objective_axes",
]

DEFAULT_OBJECTIVES = ("accuracy", "size_bytes")


@dataclass(frozen=True)
class Axis:
    """One objective: its trials-frame column (the metric's name), direction and scale.

    ``reference`` is the float model's value of a ``relative`` metric (size, bitops): the
    hypervolume divides by it, so each axis runs from 0 (best) to 1 (the float model). A metric
    with ``best`` and ``worst`` runs linearly from one to the other (see
    :class:`~quantsearch.pipeline.MetricInfo` for how they are chosen); without them a
    maximised metric is a proportion (1 - value) and a minimised one is used as it is.
    """

    name: str
    direction: str
    label: str
    relative: bool
    reference: float = 1.0
    best: float | None = None
    worst: float | None = None
    info: MetricInfo | None = None

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def proportion(self) -> bool:
        return self.info is not None and self.info.proportion

    def format(self, value: float | None, *, short: bool = False) -> str:
        """A value as labels show it: 97.4% for a proportion, else 4 digits and the unit."""
        if value is None or not math.isfinite(value):
            return "–"
        if self.proportion:
            return f"{value:.1%}" if short else f"{value:.2%}"
        unit = self.info.unit if self.info is not None else ""
        return f"{value:.4g}" + (f" {unit}" if unit else "")

    def unit(self, values: Any) -> np.ndarray:
        """Values on [0, 1], 0 best: value / reference when relative, (value - best) / (worst
        - best) with bounds, else 1 - value when maximised."""
        array = np.asarray(values, dtype=float)
        if self.relative:
            return array / self.reference
        if self.best is not None and self.worst is not None:
            return (array - self.best) / (self.worst - self.best)
        if self.maximize:
            return 1.0 - array
        return array


def float_references(record: StudyRecord) -> dict[str, float]:
    """The float model's value of each metric the study recorded one for, by metric name."""
    recorded: dict[str, Any] = {
        "size_bytes": record.float_size_bytes,
        "bitops": record.float_bitops,
    }
    if record.float_model is not None:
        recorded.update(record.float_model.metrics)
    return {
        name: float(value)
        for name, value in recorded.items()
        if value and math.isfinite(float(value))
    }


def _reference(name: str, frame: pd.DataFrame, references: Mapping[str, float]) -> float:
    """The float model's value of metric ``name``: the study's (``references``), else the
    trials' ``float_<name>`` column, else the float baseline's, else the largest one seen."""
    recorded = references.get(name)
    if recorded:
        return float(recorded)
    if f"float_{name}" in frame:
        values = frame[f"float_{name}"].dropna()
        if not values.empty:
            return float(values.max())
    if name in frame:
        float_rows = frame[(frame["baseline"] == "float") & (frame["state"] == "COMPLETE")]
        if not float_rows[name].dropna().empty:
            return float(float_rows[name].max())
        return float(frame[name].max())
    return 1.0


def objective_axes(
    frame: pd.DataFrame,
    *,
    metric_names: Sequence[str] | None = None,
    references: Mapping[str, float] | None = None,
    metrics: Mapping[str, MetricInfo] | None = None,
) -> list[Axis]:
    """The axes of a study's objectives (default: accuracy and size_bytes); ``references``:
    the float model's values the study recorded (:func:`float_references`)."""
    axes = []
    for name in metric_names or DEFAULT_OBJECTIVES:
        info = (metrics or {}).get(name)
        if info is None and name in METRICS:
            info = METRICS[name].info
        if info is None:  # a metric of an old study that nothing describes: a relative one
            info = MetricInfo(name=name, direction="minimize", label=name, relative=True)
        relative = info.relative
        reference = _reference(name, frame, references or {}) if relative else 1.0
        if not math.isfinite(reference) or reference <= 0:
            reference = 1.0
        best, worst = _bounds(info, frame, references or {})
        axes.append(
            Axis(
                name, info.direction, info.shown_label, relative, reference, best, worst, info
            )
        )
    return axes


def _bounds(
    info: MetricInfo, frame: pd.DataFrame, references: Mapping[str, float]
) -> tuple[float | None, float | None]:
    """(best, worst) of a metric that is neither relative nor a proportion: its declared
    bounds, else 0 and twice the float model's value, else the range the trials span."""
    if info.relative or info.proportion:
        return None, None
    if info.bounds is not None:
        worst, best = info.bounds
        return float(best), float(worst)
    reference = references.get(info.name)
    if reference:
        far = 2 * abs(reference)
        return (0.0, far) if not info.maximize else (far, 0.0)
    values = (
        frame.loc[frame["state"] == "COMPLETE", info.name].dropna()
        if info.name in frame and "state" in frame
        else pd.Series(dtype=float)
    )
    values = values[np.isfinite(values.astype(float))]
    if values.empty:
        return None, None
    low, high = float(values.min()), float(values.max())
    if high == low:
        high = low + 1.0
    return (high, low) if info.maximize else (low, high)


def hypervolume(points: np.ndarray) -> float:
    """Volume of the unit cube dominated by ``points`` (every column minimised, reference 1).

    Points outside the cube are clipped to it; exact, by slicing along the first column.
    """
    if len(points) == 0:
        return 0.0
    array = np.clip(np.asarray(points, dtype=float).reshape(len(points), -1), 0.0, 1.0)
    array = array[np.isfinite(array).all(axis=1) & (array < 1.0).all(axis=1)]
    if len(array) == 0:
        return 0.0
    array = array[front_mask(array)]
    if array.shape[1] == 1:
        return float(1.0 - array[:, 0].min())
    order = np.argsort(array[:, 0], kind="stable")
    array = array[order]
    volume = 0.0
    for index in range(len(array)):
        upper = array[index + 1, 0] if index + 1 < len(array) else 1.0
        width = upper - array[index, 0]
        if width > 0:
            volume += width * hypervolume(array[: index + 1, 1:])
    return volume


def hypervolume_2d(accuracy: Sequence[float], size_ratio: Sequence[float]) -> float:
    """Area of the unit square (size/float size, accuracy) dominated by the points.

    The reference point is (size ratio 1, accuracy 0): a model is worth area only if it is smaller
    than the float model. The result lies in [0, 1]; 1 would be a perfect model of size zero.
    """
    points = [
        (r, 1.0 - a) for a, r in zip(accuracy, size_ratio, strict=True) if math.isfinite(a)
    ]
    return hypervolume(np.asarray(points, dtype=float).reshape(len(points), 2))


def float_size_of(frame: pd.DataFrame, study_float_size: float | None = None) -> float:
    """The float model's size: the study attribute, else a trial's, else the float baseline's."""
    references = {"size_bytes": float(study_float_size)} if study_float_size else {}
    return objective_axes(frame, metric_names=["size_bytes"], references=references)[0].reference


def hypervolume_history(
    frame: pd.DataFrame,
    *,
    float_size_bytes: float | None = None,
    axes: Sequence[Axis] | None = None,
) -> pd.DataFrame:
    """After each trial (by number): the hypervolume and the size of the front so far.

    Only feasible complete trials count. Each objective is put on [0, 1] (accuracy as 1 -
    accuracy; sizes and bitops divided by the float model's), so the hypervolume is the share of
    the unit cube the front dominates, from the float model at zero accuracy. ``axes`` defaults
    to accuracy and size (divided by ``float_size_bytes``).
    """
    if axes is None:
        references = {"size_bytes": float(float_size_bytes)} if float_size_bytes else {}
        axes = objective_axes(frame, references=references)
    ordered = frame.sort_values("number")
    points: list[list[float]] = []
    hypervolume_now = 0.0
    records = []
    front = 0
    for _, row in ordered.iterrows():
        if row["state"] == "COMPLETE" and row["feasible"]:
            points.append([float(axis.unit(row[axis.name])) for axis in axes])
            mask = front_mask(np.asarray(points))
            # Only the front counts from now on: a dominated point never counts again.
            points = [p for p, on in zip(points, mask, strict=True) if on]
            hypervolume_now = hypervolume(np.asarray(points))
            front = len(points)
        records.append(
            {"number": int(row["number"]), "hypervolume": hypervolume_now, "front_size": front}
        )
    return pd.DataFrame(records, columns=["number", "hypervolume", "front_size"])
