"""The training loop every trial runs: optimizer factory, fit, evaluate."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch.tasks._batches import Batches
from quantsearch.tasks._contract import TrainRun
from quantsearch.tasks._evaluation import Measured, evaluation_mode, measure, model_device
from quantsearch.tasks._train_config import TrainConfig, resolve_device

if TYPE_CHECKING:
    from quantsearch.tasks._contract import Task

__all__ = [
    "DivergedError",
    "FitResult",
    "evaluate",
    "fit",
    "make_optimizer",
    "seed_everything",
]


# Fractions of the run after which the "step" schedule divides the learning rate by 10.
_STEP_MILESTONES = (0.5, 0.75)
# On a GPU the finiteness check forces a sync, so it looks at several losses at once.
_GPU_CHECK_EVERY = 16


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite; ``epoch`` and ``step`` count from 1."""

    def __init__(self, value: float, epoch: int, step: int) -> None:
        self.value = value
        self.epoch = epoch
        self.step = step
        super().__init__(f"loss became {value} at epoch {epoch}, step {step}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.value, self.epoch, self.step))


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` reports.

    ``final_loss`` is the mean training loss of the last epoch (NaN when no epoch ran);
    ``val_metrics`` are the task's metrics on its validation set after the last epoch, and
    ``val_accuracy`` their ``accuracy`` (NaN for a task that reports none).
    """

    epochs_run: int
    train_seconds: float
    final_loss: float
    val_accuracy: float
    epoch_losses: tuple[float, ...] = ()
    steps_run: int = 0
    val_metrics: Mapping[str, float] = field(default_factory=dict)
    val_measured: Measured | None = None
    """The validation split's measurement (with per-example values), for a task that is not a
    plain classifier."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (call before ``build_model``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], config: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params`` (tensors or parameter groups)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(schedule: str, step: int, total_steps: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    passed = sum(step >= milestone * total_steps for milestone in _STEP_MILESTONES)
    return 0.1**passed


def _first_non_finite(losses: list[Tensor]) -> tuple[int, float] | None:
    """Index and value of the first non-finite loss in ``losses``, or None."""
    stacked = torch.stack(losses)
    finite = torch.isfinite(stacked)
    if bool(finite.all()):
        return None
    index = int((~finite).nonzero()[0, 0])
    return index, float(stacked[index])


def fit(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    *,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``task.train_set`` with ``optimizer``, in place.

    The loss is the task's ``loss(model, batch)``, else ``F.cross_entropy(model(x), y)``: a
    model may return logits or log-probabilities (log_softmax of log-probabilities is the
    identity, so cross entropy then equals NLL). A task's ``training_routine`` trains instead of
    this loop, for the same budget of steps.
    ``seed`` seeds torch's global generator (dropout and the like) and the generator that
    shuffles the training set, so the same model, data and seed give the same weights on CPU.
    The model is moved to ``config.device``. ``on_epoch(epoch_index, val_accuracy)`` runs after
    each epoch (index from 0) and may raise to stop training; without it the validation set is
    evaluated only once, at the end. A NaN or infinite loss raises :class:`DivergedError`.
    """
    started = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    raw = not task.is_classifier
    batches = Batches(
        task.train_set,
        config.batch_size,
        device,
        shuffle=True,
        generator=generator,
        skip_single_tail=True,
        collate_fn=task.collate_fn,
        raw=raw,
    )
    steps_per_epoch = len(batches)
    if config.steps is None:
        epochs, total_steps = config.epochs, config.epochs * steps_per_epoch
    else:
        epochs, total_steps = math.ceil(config.steps / steps_per_epoch), config.steps
    eval_batch = max(256, config.batch_size)
    if task.training_routine is not None:
        return _fit_routine(model, task, optimizer, config, batches, total_steps, seed, started)
    scheduled = config.lr_schedule != "none"
    base_lrs: list[float] = []
    if scheduled:
        base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
    check_every = _check_interval(device)

    epoch_losses: list[float] = []
    val_accuracy = float("nan")
    val_metrics: dict[str, float] = {}
    measured: Measured | None = None
    global_step = 0
    for epoch in range(epochs):
        model.train()
        pending: list[Tensor] = []
        first_pending_step = 1
        loss_sum = 0.0
        epoch_steps = 0
        for step, batch in enumerate(batches, start=1):
            if global_step == total_steps:
                break
            if scheduled:
                factor = _lr_factor(config.lr_schedule, global_step, total_steps)
                for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=False):
                    group["lr"] = base_lr * factor
            if raw:
                loss = _task_loss(task, model, batch)
            else:
                inputs, targets = batch
                loss = F.cross_entropy(model(inputs), targets)
            pending.append(loss.detach())
            # On CPU the check comes before the update, so a NaN never reaches the weights.
            if len(pending) >= check_every:
                loss_sum += _flush(pending, epoch + 1, first_pending_step)
                first_pending_step = step + 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            global_step += 1
            epoch_steps += 1
        if pending:
            loss_sum += _flush(pending, epoch + 1, first_pending_step)
        epoch_losses.append(loss_sum / max(1, epoch_steps))
        if on_epoch is not None or epoch == epochs - 1:
            val_accuracy, val_metrics, measured = _validate(model, task, eval_batch, device)
        if on_epoch is not None:
            on_epoch(epoch, val_accuracy)
    if epochs == 0:
        val_accuracy, val_metrics, measured = _validate(model, task, eval_batch, device)
    if scheduled:
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=False):
            group["lr"] = base_lr
    return FitResult(
        epochs_run=epochs,
        train_seconds=time.perf_counter() - started,
        final_loss=epoch_losses[-1] if epoch_losses else float("nan"),
        val_accuracy=val_accuracy,
        epoch_losses=tuple(epoch_losses),
        steps_run=global_step,
        val_metrics=val_metrics,
        val_measured=measured,
    )


def _task_loss(task: Task, model: nn.Module, batch: Any) -> Tensor:
    """The task's loss for a batch, else cross-entropy of its output against ``batch[1]``."""
    if task.loss is not None:
        loss = task.loss(model, batch)
    else:
        loss = F.cross_entropy(task.output(model, batch), batch[1])
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shown = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"task {task.name!r}: loss must return a scalar tensor, got {shown}")
    return loss.reshape(())


def _validate(
    model: nn.Module, task: Task, batch_size: int, device: torch.device
) -> tuple[float, dict[str, float], Measured | None]:
    """The validation accuracy (NaN when the task reports none), every metric, and the
    measurement of a task that is not a plain classifier."""
    if task.is_classifier:
        accuracy = evaluate(model, task.val_set, batch_size=batch_size, device=device)
        return accuracy, {"accuracy": accuracy}, None
    measured = measure(model, task, task.val_set, batch_size=batch_size, device=device)
    return measured.values.get("accuracy", float("nan")), dict(measured.values), measured


def _fit_routine(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    batches: Batches,
    total_steps: int,
    seed: int,
    started: float,
) -> FitResult:
    """Train with the task's own routine; its optimizer steps are counted by a hook."""
    assert task.training_routine is not None
    steps = [0]

    def count(*_: Any) -> None:
        steps[0] += 1

    def endless() -> Iterator[Any]:
        while True:
            yield from batches

    handle = optimizer.register_step_post_hook(count)
    model.train()
    try:
        task.training_routine(
            model, optimizer, TrainRun(total_steps, batches.device, config, seed, endless)
        )
    finally:
        handle.remove()
    val_accuracy, val_metrics, measured = _validate(
        model, task, max(256, config.batch_size), batches.device
    )
    return FitResult(
        epochs_run=math.ceil(steps[0] / max(1, len(batches))),
        train_seconds=time.perf_counter() - started,
        final_loss=float("nan"),
        val_accuracy=val_accuracy,
        steps_run=steps[0],
        val_metrics=val_metrics,
        val_measured=measured,
    )


def _check_interval(device: torch.device) -> int:
    """Steps between finiteness checks of the loss: every step on a CPU, where it costs nothing."""
    return 1 if device.type == "cpu" else _GPU_CHECK_EVERY


def _flush(pending: list[Tensor], epoch: int, first_step: int) -> float:
    """Sum of the pending losses (then cleared); DivergedError at the first non-finite one."""
    if len(pending) == 1:
        value = float(pending[0])
        if not math.isfinite(value):
            raise DivergedError(value, epoch, first_step)
        pending.clear()
        return value
    bad = _first_non_finite(pending)
    if bad is not None:
        raise DivergedError(bad[1], epoch, first_step + bad[0])
    total = float(torch.stack(pending).sum())
    pending.clear()
    return total


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = "cpu",
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, in [0, 1].

    Runs in eval mode under ``torch.no_grad`` and restores every submodule's training flag.
    The model is moved to ``device`` ("auto" picks CUDA when available; None keeps the device
    of the model's first parameter or buffer).
    """
    resolved = model_device(model) if device is None else resolve_device(device)
    correct = torch.zeros((), dtype=torch.long, device=resolved)
    total = 0
    with evaluation_mode(model, resolved):
        for inputs, targets in Batches(dataset, batch_size, resolved, shuffle=False):
            correct += (model(inputs).argmax(dim=1) == targets).sum()
            total += targets.shape[0]
    return int(correct) / total
