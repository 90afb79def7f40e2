"""A study's objectives as plot axes, and the hypervolume they span."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd

from quantsearch.pipeline import METRICS, front_mask

__all__ = [
    "DEFAULT_OBJECTIVES",
    "Axis",
    "front_mask",
    "hypervolume",
    "objective_axes",
    "study_axes",
]

DEFAULT_OBJECTIVES = ("accuracy", "size_bytes")


@dataclass(frozen=True)
class Axis:
    """One objective: its trials-frame column (the metric's name), direction and scale.

    ``reference`` is the float model's value of a ``relative`` metric (size, bitops): the
    hypervolume divides by it, so each axis runs from 0 (best) to 1 (the float model).
    """

    name: str
    direction: str
    label: str
    relative: bool
    reference: float = 1.0

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def unit(self, values: Any) -> np.ndarray:
        """Values on [0, 1], 0 best: 1 - value when maximised, value / reference when relative."""
        array = np.asarray(values, dtype=float)
        if self.maximize:
            return 1.0 - array
        return array / self.reference if self.relative else array


def _reference(name: str, frame: pd.DataFrame, attrs: Mapping[str, Any]) -> float:
    """The float model's value of metric ``name``: study attribute ``float_<name>``, else the
    float baseline's, else the largest one seen."""
    recorded = attrs.get(f"float_{name}")
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
    attrs: Mapping[str, Any] | None = None,
) -> list[Axis]:
    """The axes of a study's objectives (default: accuracy and size_bytes)."""
    axes = []
    for name in metric_names or DEFAULT_OBJECTIVES:
        metric = METRICS.get(name)
        direction = metric.direction if metric else "minimize"
        relative = metric.relative if metric else direction == "minimize"
        label = metric.label if metric else name
        reference = _reference(name, frame, attrs or {}) if relative else 1.0
        if not math.isfinite(reference) or reference <= 0:
            reference = 1.0
        axes.append(Axis(name, direction, label, relative, reference))
    return axes


def study_axes(study: optuna.Study, frame: pd.DataFrame) -> list[Axis]:
    return objective_axes(frame, metric_names=study.metric_names, attrs=study.user_attrs)


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
