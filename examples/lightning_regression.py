"""The diabetes regression of ``regression_task.py`` written as a PyTorch Lightning module and
run through :func:`quantsearch.tasks.lightning_task` (the extras ``quantsearch[lightning]`` and
``quantsearch[metrics]``).

The module is ordinary Lightning code: ``training_step`` returns the smooth-L1 loss,
``validation_step`` logs ``mae`` in the target's units (torchmetrics'
``mean_absolute_error``), ``configure_optimizers`` returns Adam at lr 3e-3, which becomes the
task's default training settings. No ``Trainer`` runs: quantsearch calls these hooks in its own
loop, so it counts every optimizer step. See ``search_spaces/regression_lightning.yaml``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics.functional import mean_absolute_error

from quantsearch.tasks import Task, TaskError, TaskMetric, lightning_task

OPTIONS = {"hidden": 32, "limit": None}


class DiabetesRegressor(pl.LightningModule):
    """Ten standardised features in, one standardised target out; MAE logged in points."""

    def __init__(self, num_features: int, hidden: int, target_scale: float) -> None:
        super().__init__()
        self.target_scale = target_scale
        self.fc1 = nn.Linear(num_features, hidden)
        self.relu1 = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU6()
        self.head = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.relu2(self.fc2(self.relu1(self.fc1(features))))).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features, target = batch
        loss = nn.functional.smooth_l1_loss(self(features), target)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        features, target = batch
        mae = mean_absolute_error(self(features), target) * self.target_scale
        self.log("mae", mae, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """60/20/20 split from ``seed``; ``options``: ``hidden`` units, ``limit`` rows."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TaskError(f"diabetes-lightning: unknown option(s) {unknown}")
    features, targets = load_diabetes(return_X_y=True)
    if options.get("limit") is not None:
        features, targets = features[: options["limit"]], targets[: options["limit"]]
    indices = np.arange(len(targets))
    train, rest = train_test_split(indices, test_size=0.4, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed)
    mean, std = features[train].mean(axis=0), features[train].std(axis=0) + 1e-8
    t_mean, t_std = float(targets[train].mean()), float(targets[train].std())
    x = torch.from_numpy(((features - mean) / std).astype(np.float32))
    y = torch.from_numpy(((targets - t_mean) / t_std).astype(np.float32))

    def split(index: np.ndarray) -> TensorDataset:
        return TensorDataset(x[index], y[index])

    return lightning_task(
        "diabetes-lightning",
        functools.partial(
            DiabetesRegressor, x.shape[1], options.get("hidden", OPTIONS["hidden"]), t_std
        ),
        split(train),
        split(val),
        split(test),
        x[train[:1]],
        metrics=[TaskMetric("mae", "minimize", "mean absolute error", unit="points")],
        description="scikit-learn's diabetes data, a LightningModule MLP regressor (MAE)",
    )
