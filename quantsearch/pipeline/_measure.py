"""A trial's metrics on one split: the task's own and the fidelity ones, with their intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantsearch.pipeline._fidelity import (
    FIDELITY_METRICS,
    fidelity,
    float_outputs,
    model_outputs,
)
from quantsearch.pipeline._metrics import accuracy_interval, bootstrap_interval
from quantsearch.tasks import Measured, Task, TaskMetric, evaluate, measure

__all__ = ["SplitMetrics", "known_metrics", "measure_split"]


@dataclass(frozen=True)
class SplitMetrics:
    """A split's metrics by name, the 95% intervals of those that have one, its examples."""

    values: dict[str, float]
    samples: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


def _interval(
    metric: TaskMetric | None, proportion: bool, value: float, samples: int,
    per_example: np.ndarray | None,
) -> tuple[float, float] | None:
    """Wilson for a proportion, a bootstrap from per-example values, else none."""
    if not math.isfinite(value):
        return None
    if proportion:
        count = len(per_example) if per_example is not None else samples
        return accuracy_interval(value, count)
    if per_example is not None and len(per_example) > 1:
        reduce = metric.reduce if metric is not None else None
        return bootstrap_interval(per_example, reduce)
    return None


def measure_split(
    model: nn.Module,
    task: Task,
    split: str,
    *,
    device: torch.device,
    batch_size: int = 256,
    measured: Measured | None = None,
    fidelity_names: Sequence[str] = (),
    float_weights: str | Path | None = None,
) -> SplitMetrics:
    """The metrics of ``model`` on ``split`` ("val" or "test"): the task's (``measured`` when
    the caller has them already), then the fidelity metrics ``fidelity_names`` against the
    float model's outputs (computed once beside ``float_weights``)."""
    dataset = task.val_set if split == "val" else task.test_set
    if measured is None:
        if task.is_classifier:
            accuracy = evaluate(model, dataset, batch_size=batch_size, device=device)
            measured = Measured(values={"accuracy": accuracy}, samples=len(dataset))  # type: ignore[arg-type]
        else:
            measured = measure(model, task, dataset, batch_size=batch_size, device=device)
    values = dict(measured.values)
    per_example: dict[str, np.ndarray] = dict(measured.per_example)
    declared = {m.name: m for m in task.task_metrics}
    if fidelity_names:
        if float_weights is None:
            raise ValueError("the fidelity metrics need the study's float weights")
        reference = float_outputs(
            float_weights, task, split, batch_size=batch_size, device=device
        )
        got = model_outputs(model, task, dataset, batch_size=batch_size, device=device)
        more, more_per = fidelity(fidelity_names, got, reference)
        values.update(more)
        per_example.update(more_per)
    intervals: dict[str, tuple[float, float]] = {}
    for name, value in values.items():
        metric = declared.get(name)
        proportion = (
            metric.proportion if metric is not None
            else name in FIDELITY_METRICS and FIDELITY_METRICS[name].proportion
        )
        interval = _interval(metric, proportion, value, measured.samples, per_example.get(name))
        if interval is not None and all(math.isfinite(v) for v in interval):
            intervals[name] = interval
    return SplitMetrics(values=values, samples=measured.samples, intervals=intervals)


def known_metrics(task: Task) -> Mapping[str, TaskMetric]:
    """The task's declared metrics by name."""
    return {m.name: m for m in task.task_metrics}
