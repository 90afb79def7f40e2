"""Metrics a study can optimise: a registry of name -> direction and how it is computed."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict
from torch import nn

from quantsearch.pipeline._record import TrialRecord
from quantsearch.tasks import call_model

if TYPE_CHECKING:
    from quantsearch.tasks import Task

__all__ = [
    "FLOAT_BITS",
    "METRICS",
    "Evaluated",
    "Metric",
    "MetricInfo",
    "ModelProfile",
    "accuracy_interval",
    "bootstrap_interval",
    "front_mask",
    "front_trials",
    "get_metric",
    "metric_info",
    "register_metric",
]

#: Bits of a tensor that stays float, for size and bitops.
FLOAT_BITS = 32
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ModelProfile:
    """The float model's leaf modules in the order a forward pass runs them, with the
    multiply-accumulates of each conv and linear layer (traced once on ``dummy_input``)."""

    order: tuple[str, ...]
    macs: Mapping[str, int]

    @classmethod
    def trace(cls, model: nn.Module, dummy_input: Any) -> ModelProfile:
        order: list[str] = []
        macs: dict[str, int] = {}
        names = {id(m): n for n, m in model.named_modules()}

        def record(module: nn.Module, _inputs: tuple, output: Any) -> None:
            name = names[id(module)]
            order.append(name)
            if isinstance(module, _WEIGHTED) and isinstance(output, torch.Tensor):
                # Each output element takes one MAC per weight that feeds it.
                per_output = module.weight[0].numel()
                if isinstance(module, nn.Linear):
                    per_output = module.in_features
                macs[name] = macs.get(name, 0) + output.numel() * per_output

        handles = [
            m.register_forward_hook(record)
            for n, m in model.named_modules()
            if n and not any(True for _ in m.children())
        ]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                call_model(model, dummy_input)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return cls(order=tuple(order), macs=macs)

    def bitops(self, layer_bits: Mapping[str, Mapping[str, int]]) -> float:
        """Sum over conv/linear layers of MACs x weight bits x activation bits.

        A layer's activation bits are its own input bits when its input is quantized, else
        those of the last output quantizer run since the previous conv/linear layer (pooling,
        flattening and the like keep a quantized tensor's levels), else 32. Float layers
        count 32 x 32.
        """
        total = 0.0
        activation = FLOAT_BITS
        for name in self.order:
            bits = layer_bits.get(name, {})
            if name in self.macs:
                a_bits = bits.get("input", activation)
                total += self.macs[name] * bits.get("weight", FLOAT_BITS) * a_bits
                activation = bits.get("output", FLOAT_BITS)
            elif "output" in bits:
                activation = bits["output"]
        return total


@dataclass(frozen=True)
class Evaluated:
    """A trial's model after adaptation and evaluation: what metrics are computed from."""

    model: nn.Module
    task: Task
    layer_bits: Mapping[str, Mapping[str, int]]
    profile: ModelProfile
    val_accuracy: float
    size_bytes: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Every metric measured on the validation split: the task's and the fidelity ones."""


@dataclass(frozen=True)
class Metric:
    """One objective: its Optuna metric name, direction, axis label and computation.

    ``relative`` metrics are divided by the float model's value on the plots' and the
    hypervolume's axes (sizes, bitops); the others are put on [0, 1] by ``bounds`` ``(worst,
    best)``, else as proportions (``proportion``: a share of hits, with a Wilson interval),
    else by twice the float model's value (see :class:`MetricInfo`). ``unit`` follows values.
    """

    name: str
    direction: Literal["maximize", "minimize"]
    label: str
    compute: Callable[[Evaluated], float]
    relative: bool = False
    unit: str = ""
    proportion: bool = False
    bounds: tuple[float, float] | None = None

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(
            name=self.name,
            direction=self.direction,
            label=self.label,
            unit=self.unit,
            proportion=self.proportion,
            relative=self.relative,
            bounds=self.bounds,
        )


class MetricInfo(BaseModel):
    """What a study stores about one metric, so every reader labels it without the task:
    its name, direction, label, unit, whether it is a proportion (Wilson intervals, shown in
    percent) or relative to the float model (sizes), and its hypervolume ``bounds``.

    On the hypervolume's axes a metric runs from 0 (best) to 1 (worst): a relative metric as
    value / float value; one with ``bounds`` ``(worst, best)`` linearly between them; a
    proportion between 0 and 1; any other between 0 and twice the float model's value (the
    float model sits at 0.5), or, with no float value, the range the trials span.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    direction: Literal["maximize", "minimize"]
    label: str = ""
    unit: str = ""
    proportion: bool = False
    relative: bool = False
    bounds: tuple[float, float] | None = None

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def shown_label(self) -> str:
        """The axis label, with the unit: ``perplexity``, ``SQNR (dB)``."""
        label = self.label or self.name
        return f"{label} ({self.unit})" if self.unit and self.unit not in label else label

    def format(self, value: float | None) -> str:
        """A value as the reports show it: percent for proportions, else 4 significant
        digits and the unit."""
        if value is None or not math.isfinite(value):
            return "–"
        if self.proportion:
            return f"{value:.2%}"
        return f"{value:.4g}" + (f" {self.unit}" if self.unit else "")


def metric_info(
    name: str, direction: str, *, label: str = "", unit: str = "", proportion: bool = False,
    bounds: tuple[float, float] | None = None,
) -> MetricInfo:
    """The MetricInfo of a registered metric by that name, else one built from the rest."""
    known = METRICS.get(name)
    if known is not None:
        return known.info
    return MetricInfo.model_validate(
        {"name": name, "direction": direction, "label": label or name, "unit": unit,
         "proportion": proportion, "bounds": bounds}
    )


METRICS: dict[str, Metric] = {}


def _measured(name: str) -> Callable[[Evaluated], float]:
    def compute(evaluated: Evaluated) -> float:
        if name not in evaluated.metrics:
            raise KeyError(
                f"metric {name!r} was not measured (measured: {', '.join(evaluated.metrics)})"
            )
        return float(evaluated.metrics[name])

    return compute


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (a space names it in ``objectives``)."""
    if metric.direction not in ("maximize", "minimize"):
        raise ValueError(f"metric {metric.name!r}: direction must be maximize or minimize")
    METRICS[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}") from None


register_metric(
    Metric(
        "accuracy",
        "maximize",
        "validation accuracy",
        lambda e: float(e.metrics.get("accuracy", e.val_accuracy)),
        proportion=True,
    )
)
register_metric(
    Metric("size_bytes", "minimize", "model size", lambda e: float(e.size_bytes), relative=True)
)
register_metric(
    Metric(
        "bitops",
        "minimize",
        "bit operations (MACs x weight bits x activation bits)",
        lambda e: e.profile.bitops(e.layer_bits),
        relative=True,
    )
)


_Z95 = NormalDist().inv_cdf(0.975)


def accuracy_interval(accuracy: float, samples: int, z: float = _Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on ``samples`` examples."""
    if samples <= 0 or math.isnan(accuracy):
        return (math.nan, math.nan)
    denominator = 1 + z * z / samples
    centre = (accuracy + z * z / (2 * samples)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / samples + z * z / (4 * samples**2))
    half /= denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    per_example: np.ndarray,
    reduce: Callable[[np.ndarray], float] | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of ``reduce`` (default: the mean) of per-example
    values, from ``resamples`` resamples with replacement (seeded: the same values give the
    same interval)."""
    values = np.asarray(per_example, dtype=float).reshape(-1)
    if len(values) < 2 or not np.isfinite(values).all():
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    if reduce is None:
        stats = values[draws].mean(axis=1)
    else:
        stats = np.asarray([reduce(values[row]) for row in draws], dtype=float)
    low, high = np.quantile(stats, [0.025, 0.975])
    return (float(low), float(high))


def front_mask(points: np.ndarray) -> np.ndarray:
    """True for the rows of ``points`` (every column minimised) that no other row dominates."""
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)
    better = (points[:, None, :] < points[None, :, :]).any(axis=2)
    return ~(no_worse & better).any(axis=0)


def front_trials(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """The study's Pareto front (as ``study.best_trials``): complete trials that meet every
    constraint and that no other such trial dominates, a reused result listed once (as the
    trial that ran it). Equal points are all on it."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    candidates = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and TrialRecord.of(t).duplicate_of is None
        and all(c <= 0 for c in t.constraints.values())
    ]
    points = np.asarray(
        [[sign * v for sign, v in zip(signs, t.values, strict=True)] for t in candidates]
    ).reshape(len(candidates), len(signs))
    return [t for t, on in zip(candidates, front_mask(points), strict=True) if on]
