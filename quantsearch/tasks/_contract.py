"""The task contract: what a trial trains and evaluates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch.tasks._train_config import TrainConfig

__all__ = ["Task"]


@dataclass(frozen=True, eq=False)
class Task:
    """A classification problem: a model factory, three datasets and a tracing input.

    Attributes:
        name: the task's name (shown in reports).
        build_model: returns a fresh, randomly initialised float model (seed torch first for a
            reproducible initialisation, e.g. with ``seed_everything``).
        train_set, val_set, test_set: datasets of ``(x, y)`` pairs, ``y`` an integer class
            index. A two-tensor ``TensorDataset`` trains fastest.
        dummy_input: one input batch of size 1, for tracing (e.g. BatchNorm folding).
        num_classes: the number of classes; the model returns ``(batch, num_classes)`` scores.
        default_train_config: training settings that suit this task, for when none are given.
        description: one line about the data and the model.
        pretrained: trained float weights for ``build_model``'s architecture, as a state-dict
            file (``torch.save(model.state_dict(), path)``) or the state dict itself. A study
            fine-tunes or calibrates its trials from them; without them (and without
            ``task.pretrained`` in the space) the study trains the float model once.

    Tasks compare by identity: two tasks are equal only when they are the same object.
    """

    name: str
    build_model: Callable[[], nn.Module]
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    dummy_input: Tensor
    num_classes: int
    default_train_config: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    pretrained: str | Path | Mapping[str, Tensor] | None = None
