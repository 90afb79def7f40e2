"""The task contract: what a trial trains and evaluates."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch.tasks._train_config import TrainConfig

__all__ = ["ACCURACY", "Task", "TaskMetric", "TrainRun", "call_model"]


@dataclass(frozen=True)
class TaskMetric:
    """A metric a task's ``evaluate`` reports, declared once.

    Attributes:
        name: the key of the metric in what ``evaluate`` returns (a space names it in
            ``objectives``, ``constraints`` and ``target``).
        direction: "maximize" or "minimize".
        label: the axis label of the plots (default: the name).
        unit: shown after values ("" for a pure number; "dB", "nats", ...).
        proportion: the value is a share of hits in [0, 1] over the split's examples (accuracy,
            recall@k): it gets a Wilson interval and is shown in percent.
        reduce: how per-example values become the metric (default: their mean), for a bootstrap
            interval; e.g. ``lambda nll: float(np.exp(nll.mean()))`` for perplexity.
        bounds: ``(worst, best)``, the values that put the metric on [0, 1] for the
            hypervolume; None: proportions take (0, 1), other metrics twice the float model's.
    """

    name: str
    direction: Literal["maximize", "minimize"]
    label: str = ""
    unit: str = ""
    proportion: bool = False
    reduce: Callable[[np.ndarray], float] | None = None
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(
                f"metric {self.name!r}: direction must be maximize or minimize, "
                f"got {self.direction!r}"
            )

    def value_of(self, per_example: np.ndarray) -> float:
        """The metric from per-example values: ``reduce`` them, else their mean."""
        if self.reduce is not None:
            return float(self.reduce(per_example))
        return float(np.mean(per_example))


#: A classifier's metric: top-1 accuracy on the validation split.
ACCURACY = TaskMetric("accuracy", "maximize", "validation accuracy", proportion=True)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a tuple is positional arguments, a mapping keyword arguments (as
    ``torch.onnx.export`` takes ``args``)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


@dataclass
class TrainRun:
    """What a task's ``training_routine`` gets beside the model and the optimizer.

    It runs ``steps`` optimizer steps (quantsearch counts ``optimizer.step()`` calls; make them
    on the optimizer given, so QAT's step counter, ``quant_start_step`` and BNN's clipping see
    each one). ``batches()`` yields training batches on ``device`` without end, a new seeded
    order each pass over the data.
    """

    steps: int
    device: torch.device
    config: TrainConfig
    seed: int
    batches: Callable[[], Iterator[Any]]


@dataclass(frozen=True, eq=False)
class Task:
    """A model factory, three datasets, a tracing input, and how to train and evaluate.

    The zero-configuration task is a classifier: ``(x, y)`` datasets with integer labels and
    ``num_classes``; it trains with cross-entropy and reports top-1 ``accuracy``. Any other
    task gives its own ``loss`` (or ``training_routine``), ``evaluate`` and ``metrics``.

    Attributes:
        name: the task's name (shown in reports).
        build_model: returns a fresh, randomly initialised float model (seed torch first for a
            reproducible initialisation, e.g. with ``seed_everything``).
        train_set, val_set, test_set: datasets. A classifier's hold ``(x, y)`` pairs, ``y`` an
            integer class index (a two-tensor ``TensorDataset`` trains fastest); another task's
            items are anything its ``collate_fn`` batches (tensors, tuples, dicts, ...).
        dummy_input: one input of the model, for tracing (BatchNorm folding, ONNX export): a
            tensor, a tuple of positional arguments or a dict of keyword arguments.
        num_classes: a classifier's number of classes (its model returns ``(batch,
            num_classes)`` scores); None for other tasks.
        default_train_config: training settings that suit this task, for when none are given.
        description: one line about the data and the model.
        pretrained: trained float weights for ``build_model``'s architecture, as a state-dict
            file (``torch.save(model.state_dict(), path)``) or the state dict itself.
        loss: ``loss(model, batch) -> scalar tensor``, the training step's loss for a batch
            (on the training device). Default: cross-entropy of ``forward(model, batch)``
            against ``batch[1]``.
        training_routine: ``training_routine(model, optimizer, run: TrainRun)``: the task's
            whole training loop for ``run.steps`` steps, instead of quantsearch's (``loss`` is
            then unused).
        evaluate: ``evaluate(model, batches) -> {metric: value}``: the model (in eval mode,
            under ``torch.no_grad``) and an iterable of batches of one split on the model's
            device. A value is a number, or a 1-D sequence of per-example values (the metric
            is ``TaskMetric.reduce`` of them, and gets a bootstrap interval). Default: top-1
            accuracy.
        metrics: the metrics ``evaluate`` reports, with their directions. Default: accuracy.
        forward: ``forward(model, batch) -> output``: the model's output for a batch, for
            calibration, sensitivity, the dry run and the fidelity metrics. Default: the model
            on ``batch[0]`` (a tuple's first item; a dict or tensor batch is the input).
        collate_fn: how a DataLoader batches the datasets' items (default: torch's).

    Tasks compare by identity: two tasks are equal only when they are the same object.
    """

    name: str
    build_model: Callable[[], nn.Module]
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    dummy_input: Any
    num_classes: int | None = None
    default_train_config: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    pretrained: str | Path | Mapping[str, Tensor] | None = None
    loss: Callable[[nn.Module, Any], Tensor] | None = None
    training_routine: Callable[[nn.Module, torch.optim.Optimizer, TrainRun], Any] | None = None
    evaluate: Callable[[nn.Module, Iterable[Any]], Mapping[str, Any]] | None = None
    metrics: Sequence[TaskMetric] = ()
    forward: Callable[[nn.Module, Any], Any] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None

    @property
    def is_classifier(self) -> bool:
        """Trained and evaluated as quantsearch's default classifier (cross-entropy, top-1)."""
        return (
            self.num_classes is not None
            and self.loss is None
            and self.training_routine is None
            and self.evaluate is None
            and self.collate_fn is None
        )

    @property
    def trains(self) -> bool:
        """Whether the task can train a model (a classifier, a loss or a routine)."""
        return self.is_classifier or self.loss is not None or self.training_routine is not None

    @property
    def task_metrics(self) -> tuple[TaskMetric, ...]:
        """The metrics evaluate reports: ``metrics``, else accuracy for a classifier."""
        if self.metrics:
            return tuple(self.metrics)
        if self.evaluate is None and self.num_classes is not None:
            return (ACCURACY,)
        return ()

    def output(self, model: nn.Module, batch: Any) -> Any:
        """The model's output for a batch: ``forward``, else the model on the batch's input."""
        if self.forward is not None:
            return self.forward(model, batch)
        if isinstance(batch, list | tuple) and not isinstance(batch, Tensor):
            return call_model(model, batch[0])
        return call_model(model, batch)
