"""A task that is not a classifier: regression on scikit-learn's bundled diabetes data (442
patients, 10 features), batches as dicts, its own loss and its own metric (MAE).

Use it in a search space with ``task: examples/regression_task.py:make_task`` and name its
metric in the objectives: ``objectives: [mae, size_bytes]`` (the task declares that MAE is
minimized). See ``search_spaces/regression_diabetes.yaml``.

Everything a worker process needs comes from ``make_task``: quantsearch rebuilds the task by
this file path in each worker, so nothing here may depend on state set up elsewhere.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch.tasks import Task, TaskError, TaskMetric, TrainConfig

OPTIONS = {"hidden": 32, "limit": None}


class DiabetesMLP(nn.Module):
    """Features in (as the keyword argument ``features``), one standardised target out."""

    def __init__(self, num_features: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_features, hidden)
        self.relu1 = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU6()
        self.head = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.relu2(self.fc2(self.relu1(self.fc1(features))))).squeeze(-1)


class DictDataset(Dataset):
    """Items as ``{"features": x, "target": y}``; the default collate stacks them by key."""

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"features": self.features[index], "target": self.targets[index]}


def forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's output for a batch: the features go in by keyword."""
    return model(features=batch["features"])


def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Smooth L1 on the standardised target."""
    return nn.functional.smooth_l1_loss(forward(model, batch), batch["target"])


def make_evaluate(scale: float) -> Any:
    def evaluate(model: nn.Module, batches: Any) -> dict[str, Tensor]:
        """Per-example absolute errors in the target's own units: MAE is their mean, and
        quantsearch computes its bootstrap interval from them."""
        errors = [
            (forward(model, batch) - batch["target"]).abs() * scale for batch in batches
        ]
        return {"mae": torch.cat(errors)}

    return evaluate


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """60/20/20 split from ``seed``; ``options``: ``hidden`` units, ``limit`` rows."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TaskError(f"diabetes: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}")
    hidden = options.get("hidden", OPTIONS["hidden"])
    limit = options.get("limit")
    features, targets = load_diabetes(return_X_y=True)
    if limit is not None:
        features, targets = features[:limit], targets[:limit]
    indices = np.arange(len(targets))
    train, rest = train_test_split(indices, test_size=0.4, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed)
    mean, std = features[train].mean(axis=0), features[train].std(axis=0) + 1e-8
    t_mean, t_std = float(targets[train].mean()), float(targets[train].std())
    x = torch.from_numpy(((features - mean) / std).astype(np.float32))
    y = torch.from_numpy(((targets - t_mean) / t_std).astype(np.float32))

    def split(index: np.ndarray) -> DictDataset:
        return DictDataset(x[index], y[index])

    return Task(
        name="diabetes",
        build_model=functools.partial(DiabetesMLP, x.shape[1], hidden),
        train_set=split(train),
        val_set=split(val),
        test_set=split(test),
        dummy_input={"features": x[train[:1]]},
        loss=loss,
        forward=forward,
        evaluate=make_evaluate(t_std),
        metrics=(TaskMetric("mae", "minimize", "mean absolute error", unit="points"),),
        # Longer training overfits 265 rows: 10 epochs give a test MAE near linear regression's.
        default_train_config=TrainConfig(epochs=10, batch_size=32, lr=3e-3),
        description="scikit-learn's diabetes data, 10 features, MLP regressor (MAE)",
    )
