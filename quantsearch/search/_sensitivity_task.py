"""What sensitivity measures on a task: a classifier's cross-entropy and top-1 accuracy; any
other task's own loss (or, without one, the outputs' noise against the float model's) and its
quality metric, the space's first objective that is not a cost (reported by the task's
evaluate, or a fidelity metric computed against the float model's outputs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quantsearch.pipeline import FIDELITY_METRICS, LATENCY_METRIC, METRICS, fidelity, main_tensor
from quantsearch.search._errors import SpaceError
from quantsearch.search._spec import SearchSpec
from quantsearch.search._task_metrics import resolve_metrics
from quantsearch.tasks import Task, resolve_device

__all__ = [
    "batch_loss",
    "classifier_sensitivity_eval",
    "outputs_on",
    "quality_metric",
    "sensitivity_metric",
    "task_sensitivity_eval",
]

# Objectives that cost rather than measure quality.
_COSTS = ("size_bytes", "bitops", LATENCY_METRIC)


def quality_metric(objectives: Iterable[str]) -> str | None:
    """The first objective that is not a cost (size, bitops, latency): the metric
    sensitivity reports for a task that is not a classifier."""
    return next((name for name in objectives if name not in _COSTS), None)


def sensitivity_metric(spec: SearchSpec, task: Task) -> tuple[str | None, str]:
    """The metric sensitivity measures beside the loss, and its direction: ``accuracy`` for a
    classifier, else ``quality_metric`` of the objectives (None when every one is a cost)."""
    if task.is_classifier:
        return "accuracy", "maximize"
    name = quality_metric(spec.objectives)
    if name is None:
        return None, "maximize"
    try:
        info = resolve_metrics(spec, task).get(name)
    except SpaceError:
        info = None
    if info is not None:
        return name, info.direction
    return name, METRICS[name].direction if name in METRICS else "maximize"


def outputs_on(task: Task, model: nn.Module, batches: Iterable[Any], config: Any) -> list[Tensor]:
    """The model's compared output on each batch (eval mode, no_grad, on the CPU)."""
    model.eval().to(resolve_device(config.device))
    with torch.no_grad():
        return [main_tensor(task.output(model, b)).float().cpu() for b in batches]


def batch_loss(task: Task, model: nn.Module, batch: Any) -> Tensor:
    """The training loss of one batch: the task's ``loss``, else cross-entropy on ``batch[1]``."""
    if task.loss is not None:
        return task.loss(model, batch).reshape(())
    return nn.functional.cross_entropy(task.output(model, batch), batch[1])


def _count(batch: Any) -> int:
    first = batch
    while not isinstance(first, Tensor):
        if isinstance(first, dict):
            first = next(iter(first.values()))
        elif isinstance(first, list | tuple) and first:
            first = first[0]
        else:
            return 1
    return int(first.shape[0]) if first.dim() else 1


def classifier_sensitivity_eval(
    model: nn.Module, batches: Iterable[Any]
) -> tuple[float, float, int]:
    """(mean cross-entropy loss, top-1 accuracy, images) of a classifier on ``batches``."""
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            model.to(inputs.device)
            scores = model(inputs)
            loss += float(nn.functional.cross_entropy(scores, targets, reduction="sum"))
            correct += int((scores.argmax(dim=1) == targets).sum())
            count += int(targets.shape[0])
    return loss / max(count, 1), correct / max(count, 1), count


def task_sensitivity_eval(
    task: Task,
    model: nn.Module,
    batches: Iterable[Any],
    quality: str | None,
    reference: Callable[[], list[Tensor]],
    config: Any,
) -> tuple[float, float, int]:
    """(loss, ``quality``, examples) on ``batches``. The loss is the task's mean loss per
    batch, or for a task without one the outputs' noise-to-signal ratio against the float
    model's (``reference()``: its outputs on the same batches); the metric is as the task's
    evaluate reports it on those batches, else, for a fidelity metric (agreement, kl,
    sqnr_db, cosine), computed against ``reference()`` (NaN when neither)."""
    model.to(resolve_device(config.device))
    batches = list(batches)
    count = sum(_count(b) for b in batches)
    with torch.no_grad():
        outputs: list[Tensor] | None = None
        if task.loss is not None or task.is_classifier:
            losses = [float(batch_loss(task, model, b)) for b in batches]
            loss = sum(losses) / max(len(losses), 1)
        else:
            outputs = [main_tensor(task.output(model, b)).float().cpu() for b in batches]
            noise = signal = 0.0
            for out, want in zip(outputs, reference(), strict=True):
                noise += float(((out - want) ** 2).sum())
                signal += float((want**2).sum())
            loss = noise / signal if signal else math.nan
        metric = math.nan
        value = None
        if quality is not None and task.evaluate is not None:
            value = task.evaluate(model, batches).get(quality)
        if value is not None:
            tensor = torch.as_tensor(value, dtype=torch.float64)
            metric = float(tensor.mean()) if tensor.dim() else float(tensor)
        elif quality in FIDELITY_METRICS:
            if outputs is None:
                outputs = [main_tensor(task.output(model, b)).float().cpu() for b in batches]
            metric = fidelity([quality], outputs, reference())[0][quality]
    return loss, metric, count
