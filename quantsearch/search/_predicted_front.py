"""The predicted Pareto set of a measured sensitivity, and the seed configs taken from it.

The predicted cost of a whole config is the sum of its parameters' increases, its size the
float size plus the sum of their size changes: the Pareto set of (increase, size) is a
multiple-choice knapsack, solved exactly by merging the Pareto sets layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from quantsearch.pipeline import Bits, Sensitivity
from quantsearch.search._config_builder import FLOAT
from quantsearch.search._spec import SensitivitySpec

__all__ = ["PredictedPoint", "predicted_front", "seed_configs"]

@dataclass(frozen=True)
class PredictedPoint:
    """One config of the predicted Pareto set."""

    increase: float
    size_bytes: int
    bits: dict[str, Bits]


def predicted_front(sensitivity: Sensitivity) -> list[PredictedPoint]:
    """The exact Pareto set of (predicted increase, size), smallest first.

    Merging layer by layer keeps only non-dominated partial sums: any config on the final
    front is made of non-dominated partial configs, so nothing on it is lost.
    """
    front = [PredictedPoint(0.0, sensitivity.float_size_bytes, {})]
    for name, values in sensitivity.candidates.items():
        param = sensitivity.param(name)
        options = [
            (sensitivity.increase(name, b), 0 if b == FLOAT else param.entry(b).size_delta, b)
            for b in values
            if b == FLOAT or param.entry(b) is not None
        ]
        merged = [
            PredictedPoint(p.increase + inc, p.size_bytes + delta, {**p.bits, name: b})
            for p in front
            for inc, delta, b in options
        ]
        front = _pareto(merged)
    return front


def _pareto(points: Sequence[PredictedPoint]) -> list[PredictedPoint]:
    ordered = sorted(points, key=lambda p: (p.size_bytes, p.increase))
    kept: list[PredictedPoint] = []
    best = math.inf
    for point in ordered:
        if point.increase < best:
            kept.append(point)
            best = point.increase
    return kept


def seed_configs(
    sensitivity: Sensitivity,
    count: int,
    *,
    exclude: Sequence[Mapping[str, Bits]] = (),
    spread: str = SensitivitySpec.spread,
) -> list[dict[str, Bits]]:
    """``count`` configs of the predicted Pareto set, in the order they are to be tried.

    ``spread``: ``hypervolume`` adds, one at a time, the config that grows the predicted
    front's hypervolume most (size / float size against the increase scaled to [0, 1]), so
    every prefix covers where the front bends; ``size`` takes the configs nearest to
    ``count`` sizes spaced evenly between the smallest and the largest, the two ends first
    and then halving the gaps. Configs in ``exclude`` (the baselines) are skipped: they run
    anyway.
    """
    front = [p for p in predicted_front(sensitivity) if dict(p.bits) not in list(exclude)]
    count = min(count, len(front))
    if count <= 0:
        return []
    if spread == "size":
        chosen = _halving_order(sorted(_by_size(front, count)))
    else:
        chosen = _by_hypervolume(front, count, sensitivity.float_size_bytes)
    return [front[i].bits for i in chosen]


def _by_size(front: Sequence[PredictedPoint], count: int) -> list[int]:
    low, high = front[0].size_bytes, front[-1].size_bytes
    chosen: list[int] = []
    for k in range(count):
        target = low + (high - low) * k / max(count - 1, 1)
        free = [i for i in range(len(front)) if i not in chosen]
        chosen.append(min(free, key=lambda i: abs(front[i].size_bytes - target)))
    return chosen


def _halving_order(items: Sequence[int]) -> list[int]:
    """The first and the last item, then the middle of each gap, coarsest gaps first."""
    if len(items) <= 2:
        return list(items)
    order = [0, len(items) - 1]
    gaps = [(0, len(items) - 1)]
    while gaps:
        low, high = gaps.pop(0)
        if high - low < 2:
            continue
        middle = (low + high) // 2
        order.append(middle)
        gaps += [(low, middle), (middle, high)]
    return [items[i] for i in order]


# Reference point of the predicted hypervolume: float size, and a little past the worst
# increase, so that the front's smallest config counts too.
_REFERENCE = (1.0, 1.05)


def _area(points: Sequence[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both minimised) below ``_REFERENCE``."""
    area, best = 0.0, _REFERENCE[1]
    for x, y in sorted(points):
        if y < best and x < _REFERENCE[0]:
            area += (_REFERENCE[0] - x) * (best - y)
            best = y
    return area


def _by_hypervolume(front: Sequence[PredictedPoint], count: int, float_size: int) -> list[int]:
    increases = [p.increase for p in front]
    low, high = min(increases), max(increases)
    scale = (high - low) or 1.0
    points = [(p.size_bytes / float_size, (p.increase - low) / scale) for p in front]
    chosen: list[int] = []
    for _ in range(count):
        base = [points[i] for i in chosen]
        free = [i for i in range(len(points)) if i not in chosen]
        chosen.append(max(free, key=lambda i: (_area([*base, points[i]]), -i)))
    return chosen
