"""A PyTorch Lightning ``LightningModule`` as a task (the extra ``quantsearch[lightning]``).

:func:`lightning_task` runs the module as it is, without a ``Trainer``: its ``training_step``
gives the loss of each training batch, its ``validation_step`` the metrics it logs with
``self.log`` / ``self.log_dict`` (averaged over the split, weighted by batch size), and its
``configure_optimizers`` the default optimizer settings. quantsearch keeps the training loop:
it makes the optimizer (from the space's ``train``, else from ``configure_optimizers``) and
counts each ``optimizer.step()``, so ``quant_start_step``, QAT's step counter and BNN's clipping
see every step. Modules that step their own optimizers (``automatic_optimization = False``)
are refused.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch.tasks._contract import Task, TaskMetric, TrainRun
from quantsearch.tasks._errors import TaskError
from quantsearch.tasks._train_config import TrainConfig

__all__ = ["LIGHTNING_EXTRA", "lightning_task"]

LIGHTNING_EXTRA = "pip install 'quantsearch[lightning]'"


def _require_lightning() -> Any:
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError as error:
        raise TaskError(
            f"lightning_task needs PyTorch Lightning, which is not installed ({error}); "
            f"install it with: {LIGHTNING_EXTRA}"
        ) from None


class _Logged:
    """Stands in for a module's ``log``/``log_dict`` while a step runs: keeps what it logs."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.values: dict[str, float] = {}

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, Tensor):
            value = value.detach().float().mean()
        self.values[str(name)] = float(value)

    def log_dict(self, values: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in values.items():
            self.log(name, value)

    def __enter__(self) -> _Logged:
        self.module.__dict__["log"] = self.log
        self.module.__dict__["log_dict"] = self.log_dict
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.__dict__.pop("log", None)
        self.module.__dict__.pop("log_dict", None)


def _lightning_module(model: nn.Module) -> nn.Module:
    if not hasattr(model, "training_step"):
        raise TaskError(
            f"lightning_task: the model is a {type(model).__name__}, which has no training_step"
        )
    if getattr(model, "automatic_optimization", True) is False:
        raise TaskError(
            "lightning_task: the module steps its own optimizers (automatic_optimization is "
            "False); quantsearch must make each optimizer step to count it"
        )
    return model


def _step_loss(model: nn.Module, batch: Any, index: int) -> Tensor:
    with _Logged(model):
        out = _lightning_module(model).training_step(batch, index)  # type: ignore[operator]
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise TaskError(
            f"lightning_task: training_step must return a scalar loss tensor (or a dict with "
            f"'loss'), got {type(out).__name__}"
        )
    return loss


def _loss(model: nn.Module, batch: Any) -> Tensor:
    """The training step's loss of one batch (batch index 0)."""
    return _step_loss(model, batch, 0)


def _routine(model: nn.Module, optimizer: torch.optim.Optimizer, run: TrainRun) -> None:
    """``run.steps`` steps of ``training_step``, each followed by one step of ``optimizer``."""
    batches: Iterator[Any] = run.batches()
    for index in range(run.steps):
        optimizer.zero_grad(set_to_none=True)
        _step_loss(model, next(batches), index).backward()
        optimizer.step()


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and batch:
        return _batch_size(batch[0])
    return 1


def _evaluate(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """What ``validation_step`` logs, averaged over the batches weighted by their sizes."""
    step = getattr(model, "validation_step", None)
    if step is None:
        raise TaskError("lightning_task: the module has no validation_step to evaluate with")
    sums: dict[str, float] = {}
    total = 0
    for index, batch in enumerate(batches):
        size = _batch_size(batch)
        with _Logged(model) as logged:
            step(batch, index)
        for name, value in logged.values.items():
            sums[name] = sums.get(name, 0.0) + value * size
        total += size
    return {name: value / max(1, total) for name, value in sums.items()}


_OPTIMIZERS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


def train_config_of(module: nn.Module, base: TrainConfig) -> TrainConfig:
    """``base`` with the optimizer, lr, momentum and weight decay of the module's
    ``configure_optimizers`` where it returns one SGD, Adam or AdamW optimizer."""
    configure = getattr(module, "configure_optimizers", None)
    if configure is None:
        return base
    made = configure()
    if isinstance(made, Mapping):
        made = made.get("optimizer")
    if isinstance(made, Sequence) and len(made) == 1:
        made = made[0]
    kind = _OPTIMIZERS.get(type(made))  # type: ignore[arg-type]
    if kind is None:
        return base
    group = made.param_groups[0]
    return dataclasses.replace(
        base,
        optimizer=kind,
        lr=float(group["lr"]),
        weight_decay=float(group.get("weight_decay", 0.0)),
        **({"momentum": float(group["momentum"])} if kind == "sgd" else {}),
    )


def lightning_task(
    name: str,
    module_factory: Callable[[], nn.Module],
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset,
    dummy_input: Any,
    *,
    metrics: Sequence[TaskMetric],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    train_config: TrainConfig | None = None,
    description: str = "",
) -> Task:
    """A task that trains and evaluates a ``LightningModule`` through its own hooks.

    Args:
        name: the task's name.
        module_factory: returns a fresh LightningModule (quantsearch seeds torch first).
        train_set, val_set, test_set: datasets; quantsearch batches them (seeded order,
            ``collate_fn``) and hands the batches to ``training_step`` / ``validation_step``.
        dummy_input: one input of the module's ``forward``, for tracing and ONNX export.
        metrics: the metrics ``validation_step`` logs that the space may name, with their
            directions (their names are the logged names).
        forward: the module's output for a batch (default: the module on the batch's first
            item), for calibration, sensitivity and the fidelity metrics.
        train_config: default training settings; None takes the optimizer of
            ``configure_optimizers`` (SGD, Adam or AdamW) with quantsearch's other defaults.

    Raises:
        TaskError: Lightning is not installed (the message names the extra), or the factory
            does not make a module with ``training_step`` and ``validation_step``.
    """
    lightning = _require_lightning()
    probe = module_factory()
    if not isinstance(probe, lightning.LightningModule):
        raise TaskError(
            f"lightning_task {name!r}: module_factory made a {type(probe).__name__}, "
            "not a LightningModule"
        )
    _lightning_module(probe)
    if not hasattr(probe, "validation_step"):
        raise TaskError(f"lightning_task {name!r}: the module has no validation_step")
    return Task(
        name=name,
        build_model=module_factory,
        train_set=train_set,
        val_set=val_set,
        test_set=test_set,
        dummy_input=dummy_input,
        default_train_config=train_config or train_config_of(probe, TrainConfig()),
        description=description,
        loss=_loss,
        training_routine=_routine,
        evaluate=_evaluate,
        metrics=tuple(metrics),
        forward=forward,
        collate_fn=collate_fn,
    )
