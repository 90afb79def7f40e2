"""A task of your own: a small MLP on scikit-learn's bundled wine data (178 samples, 3 classes).

Use it in a search space with ``task: examples/user_task.py:make_task``, or in Python:

    from quantsearch.tasks import get_task
    task = get_task("examples/user_task.py:make_task", options={"hidden": 32})

quantsearch calls ``make_task(data_dir=..., options=..., seed=...)`` and expects a ``Task`` back.
Run this file to train the float model once: ``python examples/user_task.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from quantsearch.tasks import Task, TaskError, TrainConfig

OPTIONS = {"hidden": 32}


class WineMLP(nn.Module):
    """Two hidden layers with ReLU6 modules, so a quantizer can take their outputs too."""

    def __init__(self, num_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_features, hidden)
        self.relu1 = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU6()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """The wine task: 60/20/20 stratified split from ``seed``; ``data_dir`` is not needed."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TaskError(f"wine: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}")
    hidden = options.get("hidden", OPTIONS["hidden"])
    if not isinstance(hidden, int) or hidden < 1:
        raise TaskError(f"wine: option 'hidden' must be a positive integer, got {hidden!r}")

    features, labels = load_wine(return_X_y=True)
    indices = np.arange(len(labels))
    train, rest = train_test_split(indices, test_size=0.4, random_state=seed, stratify=labels)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=labels[rest])
    # Standardise with the training split's statistics only.
    mean, std = features[train].mean(axis=0), features[train].std(axis=0) + 1e-8
    inputs = torch.from_numpy(((features - mean) / std).astype(np.float32))
    targets = torch.from_numpy(labels.astype(np.int64))

    def split(index: np.ndarray) -> TensorDataset:
        return TensorDataset(inputs[index], targets[index])

    num_features, num_classes = inputs.shape[1], int(labels.max()) + 1
    return Task(
        name="wine",
        build_model=functools.partial(WineMLP, num_features, hidden, num_classes),
        train_set=split(train),
        val_set=split(val),
        test_set=split(test),
        dummy_input=inputs[train[:1]],
        num_classes=num_classes,
        # 107 training rows make two steps an epoch, so it takes more epochs than the default.
        default_train_config=TrainConfig(epochs=40, batch_size=32, lr=1e-2),
        description="scikit-learn's wine recognition data, 13 features, MLP",
    )


if __name__ == "__main__":
    from quantsearch.tasks import evaluate, fit, get_task, make_optimizer, seed_everything

    task = get_task(f"{__file__}:make_task", seed=0)
    config = task.default_train_config
    seed_everything(0)
    model = task.build_model()
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
    test_accuracy = evaluate(model, task.test_set)
    print(
        f"{task.name}: val {result.val_accuracy:.3f}, test {test_accuracy:.3f}, "
        f"{result.train_seconds:.2f} s"
    )
