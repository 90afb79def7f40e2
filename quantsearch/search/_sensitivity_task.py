"""Sensitivity on a task that is not a plain classifier: its own loss (or, without one, the
outputs' noise against the float model's) and its own quality metric."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quantsearch.pipeline import main_tensor
from quantsearch.tasks import Task, resolve_device

__all__ = ["batch_loss", "outputs_on", "quality_metric", "task_sensitivity_eval"]

_RELATIVE = ("size_bytes", "bitops")


def quality_metric(objectives: Iterable[str]) -> str | None:
    """The first objective that is not a size: the metric sensitivity reports."""
    return next((name for name in objectives if name not in _RELATIVE), None)


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


def task_sensitivity_eval(
    task: Task,
    model: nn.Module,
    batches: Iterable[Any],
    objectives: Iterable[str],
    reference: Callable[[], list[Tensor]],
    config: Any,
) -> tuple[float, float, int]:
    """(loss, quality metric, examples) on ``batches``. The loss is the task's mean loss per
    batch, or for a task without one the outputs' noise-to-signal ratio against the float
    model's (``reference()``: its outputs on the same batches); the metric is the first
    objective that is not a size, as the task's evaluate reports it on those batches (NaN
    without one)."""
    quality = quality_metric(objectives)
    model.to(resolve_device(config.device))
    batches = list(batches)
    count = sum(_count(b) for b in batches)
    with torch.no_grad():
        if task.loss is not None or task.is_classifier:
            losses = [float(batch_loss(task, model, b)) for b in batches]
            loss = sum(losses) / max(len(losses), 1)
        else:
            noise = signal = 0.0
            for got, want in zip(batches, reference(), strict=True):
                out = main_tensor(task.output(model, got)).float().cpu()
                noise += float(((out - want) ** 2).sum())
                signal += float((want**2).sum())
            loss = noise / signal if signal else math.nan
        metric = math.nan
        if quality is not None and task.evaluate is not None:
            value = task.evaluate(model, batches).get(quality)
            if value is not None:
                tensor = torch.as_tensor(value, dtype=torch.float64)
                metric = float(tensor.mean()) if tensor.dim() else float(tensor)
    return loss, metric, count
