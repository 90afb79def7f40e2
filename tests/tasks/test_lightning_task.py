"""lightning_task: a LightningModule's own hooks train and evaluate it, quantsearch counts the
optimizer steps, and a missing Lightning names the extra."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from quantsearch.tasks import (
    LIGHTNING_EXTRA,
    Task,
    TaskError,
    TaskMetric,
    TrainConfig,
    fit,
    lightning_task,
    make_optimizer,
    measure,
    seed_everything,
)

pl = pytest.importorskip("lightning.pytorch")

MAE = TaskMetric("mae", "minimize")


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.seen: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        self.seen.append(batch_idx)
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log_dict({"mae": (self(batch[0]) - batch[1]).abs().mean(), "batches": 1.0})

    def configure_optimizers(self) -> Any:
        return {"optimizer": torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)}


def _data() -> tuple[TensorDataset, Tensor]:
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    return TensorDataset(x, y), x


def _task() -> Task:
    data, x = _data()
    return lightning_task("reg", Regressor, data, data, data, x[:1], metrics=[MAE])


def test_configure_optimizers_gives_the_default_train_config() -> None:
    config = _task().default_train_config
    assert (config.optimizer, config.lr, config.momentum) == ("sgd", 0.05, 0.5)


def test_training_step_trains_and_every_optimizer_step_is_counted() -> None:
    task = _task()
    seed_everything(0)
    model = task.build_model()
    before = measure(model, task, task.val_set).values["mae"]
    config = TrainConfig(steps=7, batch_size=16, optimizer="sgd", lr=0.05)
    optimizer = make_optimizer(model.parameters(), config)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    result = fit(model, task, optimizer, config, seed=0)
    assert result.steps_run == 7 and len(steps) == 7
    assert model.seen == list(range(7))  # the batch index passed to training_step
    after = measure(model, task, task.val_set).values["mae"]
    assert after < before


def test_logged_metrics_are_averaged_over_the_split_by_batch_size() -> None:
    task = _task()
    model = task.build_model()
    data, x = _data()
    with torch.no_grad():
        expected = float((model(x) - data.tensors[1]).abs().mean())
    measured = measure(model, task, task.val_set, batch_size=16)  # batches of 16, 16, 16, 2
    assert measured.values["mae"] == pytest.approx(expected, rel=1e-5)
    assert measured.values["batches"] == pytest.approx(1.0)


def test_a_module_that_steps_its_own_optimizers_is_refused() -> None:
    class Manual(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    data, x = _data()
    with pytest.raises(TaskError, match="automatic_optimization is False"):
        lightning_task("manual", Manual, data, data, data, x[:1], metrics=[MAE])


def test_a_plain_module_is_refused() -> None:
    data, x = _data()
    with pytest.raises(TaskError, match="made a Linear, not a LightningModule"):
        lightning_task("plain", lambda: nn.Linear(3, 1), data, data, data, x[:1], metrics=[MAE])


def test_without_lightning_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # import fails, as uninstalled
    data, x = _data()
    with pytest.raises(TaskError, match=r"pip install 'quantsearch\[lightning\]'"):
        lightning_task("reg", Regressor, data, data, data, x[:1], metrics=[MAE])
    assert "quantsearch[lightning]" in LIGHTNING_EXTRA
