"""Tasks: what a search trial trains and evaluates.

A :class:`Task` bundles a model factory, train/validation/test datasets and a tracing input.
:func:`get_task` builds a built-in task ("digits", "mnist", "fashion-mnist", "cifar10",
"cifar10-bnn") or loads one of your own ("package.module:function", "path/to/file.py:function").
:func:`fit` and :func:`evaluate` are the training loop every trial runs.
"""

from __future__ import annotations

from quantsearch.tasks._data import CIFAR10_BATCHES, IDX_FILES, read_cifar_batch, read_idx
from quantsearch.tasks._errors import TaskError
from quantsearch.tasks._models import CifarSmallCNN, DigitsCNN, MnistCNN, VGG_Cifar10
from quantsearch.tasks._task import USER_TASK_FUNCTION, Task, available_tasks, get_task
from quantsearch.tasks._training import (
    LR_SCHEDULES,
    OPTIMIZERS,
    DivergedError,
    FitResult,
    TrainConfig,
    evaluate,
    fit,
    make_optimizer,
    resolve_device,
    seed_everything,
)

__all__ = [
    "CIFAR10_BATCHES",
    "IDX_FILES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "USER_TASK_FUNCTION",
    "CifarSmallCNN",
    "DigitsCNN",
    "DivergedError",
    "FitResult",
    "MnistCNN",
    "Task",
    "TaskError",
    "TrainConfig",
    "VGG_Cifar10",
    "available_tasks",
    "evaluate",
    "fit",
    "get_task",
    "make_optimizer",
    "read_cifar_batch",
    "read_idx",
    "resolve_device",
    "seed_everything",
]
