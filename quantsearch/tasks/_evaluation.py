"""A task's metrics on one split: its own ``evaluate`` (named metrics, per-example values), or
the classifier's top-1 accuracy."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch.quantization import eval_mode
from quantsearch.tasks._batches import Batches
from quantsearch.tasks._contract import Task, TaskMetric
from quantsearch.tasks._errors import TaskError

__all__ = ["Measured", "evaluation_mode", "measure", "model_device"]


@dataclass(frozen=True)
class Measured:
    """A split's metrics: ``values`` by name; ``per_example`` where the task gave per-example
    values (a bootstrap interval comes from them); ``samples``, the split's examples."""

    values: dict[str, float]
    samples: int
    per_example: dict[str, np.ndarray] = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` on ``device`` in eval mode under ``torch.no_grad``; every submodule's training
    flag is restored afterwards (a quantizer's observers must not stay frozen)."""
    with eval_mode(model), torch.no_grad():
        model.to(device)
        yield


def _as_values(value: Any) -> np.ndarray | float:
    """A number, or a 1-D array of per-example values."""
    if isinstance(value, Tensor):
        value = value.detach().to("cpu", torch.float64)
        return float(value) if value.dim() == 0 else value.reshape(-1).numpy()
    if isinstance(value, list | tuple | np.ndarray):
        array = np.asarray(value, dtype=float).reshape(-1)
        return array
    return float(value)


def _declared(task: Task, name: str) -> TaskMetric | None:
    return next((m for m in task.task_metrics if m.name == name), None)


def measure(
    model: nn.Module,
    task: Task,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> Measured:
    """The task's metrics of ``model`` on ``dataset`` (eval mode, no_grad; the submodules'
    training flags restored). A classifier without ``evaluate`` reports top-1 ``accuracy``;
    a task with neither reports nothing (the fidelity metrics still compare its outputs)."""
    samples = len(dataset)  # type: ignore[arg-type]
    if task.evaluate is None and task.num_classes is None:
        return Measured(values={}, samples=samples)
    resolved = device if device is not None else model_device(model)
    batches = Batches(
        dataset, batch_size, resolved, shuffle=False, collate_fn=task.collate_fn,
        raw=not task.is_classifier,
    )
    with evaluation_mode(model, resolved):
        if task.evaluate is None:
            return _top1(model, task, batches, samples)
        reported = task.evaluate(model, batches)
    if not isinstance(reported, Mapping):
        raise TaskError(
            f"task {task.name!r}: evaluate must return a mapping of metric names to values, "
            f"got a {type(reported).__name__}"
        )
    values: dict[str, float] = {}
    per_example: dict[str, np.ndarray] = {}
    for name, value in reported.items():
        try:
            converted = _as_values(value)
        except (TypeError, ValueError) as error:
            raise TaskError(
                f"task {task.name!r}: evaluate's {name!r} is not a number or a sequence of "
                f"per-example numbers ({error})"
            ) from None
        if isinstance(converted, np.ndarray):
            if converted.size == 0:
                values[str(name)] = math.nan
                continue
            per_example[str(name)] = converted
            declared = _declared(task, str(name))
            values[str(name)] = (
                declared.value_of(converted) if declared else float(converted.mean())
            )
        else:
            values[str(name)] = converted
    return Measured(values=values, samples=samples, per_example=per_example)


def _top1(model: nn.Module, task: Task, batches: Batches, samples: int) -> Measured:
    correct = torch.zeros((), dtype=torch.long, device=batches.device)
    total = 0
    for batch in batches:
        targets = batch[1]
        correct += (task.output(model, batch).argmax(dim=1) == targets).sum()
        total += targets.shape[0]
    return Measured(values={"accuracy": int(correct) / max(1, total)}, samples=samples)
