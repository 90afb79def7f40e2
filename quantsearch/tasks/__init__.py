"""Tasks: what a search trial trains and evaluates.

A :class:`Task` bundles a model factory, train/validation/test datasets and a tracing input.
:func:`get_task` builds a built-in task ("digits", "mnist", "fashion-mnist", "cifar10",
"cifar10-bnn") or loads one of your own ("package.module:function", "path/to/file.py:function").
:func:`fit` and :func:`measure` are the training loop and the evaluation every trial runs: a
classifier's cross-entropy and top-1 accuracy by default, or the task's own loss, training
routine and named metrics (:class:`TaskMetric`).
"""

from __future__ import annotations

from quantsearch.tasks._batches import Batches, batches_of, to_device
from quantsearch.tasks._contract import ACCURACY, Task, TaskMetric, TrainRun, call_model
from quantsearch.tasks._data import CIFAR10_BATCHES, IDX_FILES, read_cifar_batch, read_idx
from quantsearch.tasks._errors import TaskError
from quantsearch.tasks._evaluation import Measured, evaluation_mode, measure, model_device
from quantsearch.tasks._lightning import LIGHTNING_EXTRA, lightning_task
from quantsearch.tasks._models import CifarSmallCNN, DigitsCNN, MnistCNN, VGG_Cifar10
from quantsearch.tasks._task import available_tasks, get_task, user_task_file
from quantsearch.tasks._time_limit import (
    TASK_TIMEOUT_ENV,
    TaskTimeoutError,
    task_time_limit,
    time_limit,
)
from quantsearch.tasks._train_config import (
    LR_SCHEDULES,
    OPTIMIZERS,
    FieldRule,
    TrainConfig,
    TrainConfigError,
    resolve_device,
)
from quantsearch.tasks._training import (
    DivergedError,
    FitResult,
    evaluate,
    fit,
    make_optimizer,
    seed_everything,
)
from quantsearch.tasks._user_task import USER_TASK_FUNCTION

__all__ = [
    "ACCURACY",
    "CIFAR10_BATCHES",
    "IDX_FILES",
    "LIGHTNING_EXTRA",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "TASK_TIMEOUT_ENV",
    "USER_TASK_FUNCTION",
    "Batches",
    "CifarSmallCNN",
    "DigitsCNN",
    "DivergedError",
    "FieldRule",
    "FitResult",
    "Measured",
    "MnistCNN",
    "Task",
    "TaskError",
    "TaskMetric",
    "TaskTimeoutError",
    "TrainConfig",
    "TrainConfigError",
    "TrainRun",
    "VGG_Cifar10",
    "available_tasks",
    "batches_of",
    "call_model",
    "evaluate",
    "evaluation_mode",
    "fit",
    "get_task",
    "lightning_task",
    "make_optimizer",
    "measure",
    "model_device",
    "read_cifar_batch",
    "read_idx",
    "resolve_device",
    "seed_everything",
    "task_time_limit",
    "time_limit",
    "to_device",
    "user_task_file",
]
