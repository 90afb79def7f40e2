"""TrainConfig, make_optimizer, fit and evaluate."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from quantsearch.tasks import (
    DivergedError,
    Task,
    TrainConfig,
    TrainConfigError,
    _training,
    evaluate,
    fit,
    make_optimizer,
    resolve_device,
)


def _blobs(n: int, seed: int = 0) -> TensorDataset:
    """Three well separated Gaussian blobs in 4 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centers = torch.eye(3, 4) * 4
    inputs = centers[labels] + torch.randn(n, 4, generator=generator)
    return TensorDataset(inputs, labels)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.relu = nn.ReLU6()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.bn(self.fc1(x))))


def _task(n_train: int = 96, train_set: Dataset | None = None) -> Task:
    return Task(
        name="blobs",
        build_model=Tiny,
        train_set=train_set if train_set is not None else _blobs(n_train),
        val_set=_blobs(30, seed=1),
        test_set=_blobs(30, seed=2),
        dummy_input=torch.zeros(1, 4),
        num_classes=3,
    )


def _fresh(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


class ListDataset(Dataset):
    """A plain map-style dataset (not a TensorDataset): fit goes through a DataLoader."""

    def __init__(self, source: TensorDataset) -> None:
        self.pairs = [(x, int(y)) for x, y in zip(*source.tensors, strict=True)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.pairs[index]


# --- TrainConfig ------------------------------------------------------------------------------


def test_train_config_defaults_are_the_documented_ones() -> None:
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.optimizer, config.lr) == (3, 64, "adam", 1e-3)
    assert (config.momentum, config.weight_decay, config.lr_schedule) == (0.9, 0.0, "none")
    assert (config.device, config.num_threads) == ("cpu", None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": -1}, "TrainConfig.epochs must be an integer >= 0, got -1"),
        ({"epochs": 2.5}, "TrainConfig.epochs must be an integer >= 0, got 2.5"),
        ({"batch_size": 0}, "TrainConfig.batch_size must be an integer >= 1, got 0"),
        ({"optimizer": "rmsprop"}, "TrainConfig.optimizer must be one of sgd, adam, adamw"),
        ({"lr": 0}, "TrainConfig.lr must be a number > 0, got 0"),
        ({"lr": float("nan")}, "TrainConfig.lr must be a number > 0, got nan"),
        ({"momentum": 1.0}, "TrainConfig.momentum must be a number in [0, 1), got 1.0"),
        ({"weight_decay": -0.1}, "TrainConfig.weight_decay must be a number >= 0, got -0.1"),
        ({"lr_schedule": "linear"}, "TrainConfig.lr_schedule must be one of none, cosine, step"),
        ({"device": "tpu"}, "TrainConfig.device must be one of cpu, cuda, cuda:N, auto, got 'tpu'"),
        ({"num_threads": 0}, "TrainConfig.num_threads must be an integer >= 1, got 0"),
    ],
)
def test_train_config_rejects_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_train_config_from_dict_reads_yaml_style_values() -> None:
    config = TrainConfig.from_dict({"epochs": 2, "lr": "1e-2", "weight_decay": 0})
    assert config == TrainConfig(epochs=2, lr=0.01, weight_decay=0.0)
    assert isinstance(config.weight_decay, float)
    with pytest.raises(ValueError, match=r"unknown training option\(s\) 'lr_rate'; allowed: "):
        TrainConfig.from_dict({"lr_rate": 0.1})
    with pytest.raises(ValueError, match=r"TrainConfig\.lr must be a number, got 'fast'"):
        TrainConfig.from_dict({"lr": "fast"})


def test_train_config_error_names_the_setting_and_what_it_takes() -> None:
    with pytest.raises(TrainConfigError) as info:
        TrainConfig(device="cuda:x")
    assert (info.value.key, info.value.value) == ("device", "cuda:x")
    assert info.value.allowed == "one of cpu, cuda, cuda:N, auto"
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args
    assert TrainConfig(device="cuda:1").device == "cuda:1"


def test_checked_validates_some_settings_in_their_order() -> None:
    assert TrainConfig.checked({"lr": 1, "epochs": 0, "steps": None}) == {
        "lr": 1.0,
        "epochs": 0,
        "steps": None,
    }
    with pytest.raises(TrainConfigError, match=r"^TrainConfig\.lr must be a number > 0"):
        TrainConfig.checked({"lr": -1, "epochs": -1})
    # A search's trials train, and every key it writes has a value.
    for key, value in (("epochs", 0), ("steps", 0), ("steps", None), ("num_threads", None)):
        with pytest.raises(TrainConfigError, match=r"must be an integer >= 1, got "):
            TrainConfig.checked({key: value}, search=True)
    assert TrainConfig.rule("epochs").allowed == "an integer >= 0"
    assert TrainConfig.rule("epochs", search=True).allowed == "an integer >= 1"
    assert TrainConfig.rule("batch_size").integral
    assert not TrainConfig.rule("lr").integral


def test_make_optimizer_builds_the_named_optimizer() -> None:
    params = list(Tiny().parameters())
    sgd = make_optimizer(params, TrainConfig(optimizer="sgd", lr=0.1, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9
    assert sgd.defaults["weight_decay"] == 1e-4
    adam = make_optimizer(params, TrainConfig())
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["lr"] == 1e-3
    adamw = make_optimizer(params, TrainConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["weight_decay"] == 0.05


# --- fit --------------------------------------------------------------------------------------


def test_fit_learns_and_reports() -> None:
    task = _task()
    model = _fresh()
    config = TrainConfig(epochs=10, batch_size=16, lr=3e-2)
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
    assert result.steps_run == 60  # 10 epochs of 96 examples in batches of 16
    assert result.val_accuracy == evaluate(model, task.val_set)
    assert result.epochs_run == 10
    assert result.val_accuracy >= 0.95
    assert len(result.epoch_losses) == 10
    assert result.final_loss == result.epoch_losses[-1]
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.train_seconds > 0


def test_fit_calls_on_epoch_with_index_and_val_accuracy() -> None:
    task = _task()
    model = _fresh()
    seen: list[tuple[int, float]] = []
    config = TrainConfig(epochs=3, batch_size=16, lr=1e-2)
    result = fit(
        model,
        task,
        make_optimizer(model.parameters(), config),
        config,
        seed=0,
        on_epoch=lambda epoch, accuracy: seen.append((epoch, accuracy)),
    )
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    assert seen[-1][1] == result.val_accuracy == evaluate(model, task.val_set)


def test_on_epoch_may_stop_training_by_raising() -> None:
    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, accuracy: float) -> None:
        raise Stop(epoch)

    model = _fresh()
    config = TrainConfig(epochs=5)
    with pytest.raises(Stop) as info:
        fit(
            model,
            _task(),
            make_optimizer(model.parameters(), config),
            config,
            seed=0,
            on_epoch=stop_after_first,
        )
    assert info.value.args == (0,)


def test_zero_epochs_trains_nothing_but_validates() -> None:
    model = _fresh()
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(epochs=0)
    result = fit(model, _task(), make_optimizer(model.parameters(), config), config, seed=0)
    assert result.epochs_run == 0
    assert math.isnan(result.final_loss)
    assert 0.0 <= result.val_accuracy <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_plain_dataset_trains_exactly_like_a_tensor_dataset() -> None:
    source = _blobs(50)
    config = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.05)
    weights = []
    for train_set in (source, ListDataset(source)):
        model = _fresh()
        task = _task(train_set=train_set)
        fit(model, task, make_optimizer(model.parameters(), config), config, seed=7)
        weights.append(model.fc2.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_a_trailing_batch_of_one_is_skipped() -> None:
    # 33 examples in batches of 16: BatchNorm1d would fail on the last batch of one example.
    steps: list[int] = []
    model = _fresh()
    config = TrainConfig(epochs=1, batch_size=16)
    optimizer = make_optimizer(model.parameters(), config)
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    fit(model, _task(33), optimizer, config, seed=0)
    assert len(steps) == 2


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("none", [0.1] * 8),
        ("step", [0.1] * 4 + [0.01] * 2 + [0.001] * 2),
        ("cosine", [0.1 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]),
    ],
)
def test_lr_schedules_set_the_rate_of_every_step(schedule: str, expected: list[float]) -> None:
    model = _fresh()
    config = TrainConfig(epochs=2, batch_size=24, optimizer="sgd", lr=0.1, lr_schedule=schedule)
    optimizer = make_optimizer(model.parameters(), config)
    rates: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: rates.append(opt.param_groups[0]["lr"]))
    fit(model, _task(96), optimizer, config, seed=0)
    assert rates == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_num_threads_sets_torch_threads() -> None:
    previous = torch.get_num_threads()
    model = _fresh()
    config = TrainConfig(epochs=1, num_threads=2)
    try:
        fit(model, _task(), make_optimizer(model.parameters(), config), config, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_fit_rejects_cuda_when_it_is_missing() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    model = _fresh()
    config = TrainConfig(device="cuda")
    with pytest.raises(ValueError, match="device 'cuda' asked for, but CUDA is not available"):
        fit(model, _task(), make_optimizer(model.parameters(), config), config, seed=0)
    assert resolve_device("auto") == torch.device("cpu")


# --- divergence -------------------------------------------------------------------------------


class NanAfter(nn.Module):
    """Outputs NaN from its ``bad_call``-th forward call on (counting from 1)."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0
        self.bad_call = bad_call

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = self.fc(x)
        return out * float("nan") if self.calls >= self.bad_call else out


def test_nan_loss_raises_diverged_error_naming_epoch_and_step() -> None:
    # 96 examples in batches of 16: 6 steps an epoch, so call 9 is epoch 2, step 3.
    model = NanAfter(bad_call=9)
    config = TrainConfig(epochs=3, batch_size=16)
    optimizer = make_optimizer(model.parameters(), config)
    with pytest.raises(DivergedError) as info:
        fit(model, _task(96), optimizer, config, seed=0)
    assert str(info.value) == "loss became nan at epoch 2, step 3"
    assert (info.value.epoch, info.value.step) == (2, 3)
    # The check comes before the update: the weights never saw the NaN.
    assert torch.isfinite(model.fc.weight).all()


def test_diverged_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(DivergedError(float("inf"), 1, 4)))
    assert str(error) == "loss became inf at epoch 1, step 4"
    assert error.step == 4


def test_huge_learning_rate_diverges() -> None:
    # One SGD step at lr 1e38 overflows the weights of a bare linear layer.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    config = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=1e38, momentum=0.0)
    with pytest.raises(DivergedError, match=r"^loss became (nan|inf) at epoch 1, step 2$"):
        fit(model, _task(), make_optimizer(model.parameters(), config), config, seed=0)


def test_batched_checks_still_name_the_first_bad_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU the loss is checked every few steps; the step named is still the first bad one.
    monkeypatch.setattr(_training, "_check_interval", lambda device: 4)
    model = NanAfter(bad_call=6)
    config = TrainConfig(epochs=2, batch_size=16)
    with pytest.raises(DivergedError, match=r"^loss became nan at epoch 1, step 6$"):
        fit(model, _task(96), make_optimizer(model.parameters(), config), config, seed=0)


def test_batched_checks_give_the_same_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(epochs=2, batch_size=16)
    losses = []
    for interval in (1, 4):
        monkeypatch.setattr(_training, "_check_interval", lambda device, i=interval: i)
        model = _fresh()
        result = fit(model, _task(), make_optimizer(model.parameters(), config), config, seed=0)
        losses.append(result.epoch_losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# --- evaluate ---------------------------------------------------------------------------------


class Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.bn = nn.BatchNorm1d(4)
        self.grad_seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.grad_seen.append(torch.is_grad_enabled())
        out = torch.zeros(x.shape[0], 3)
        out[:, self.label] = 1.0
        return out + 0 * self.bn(x).sum()


def test_evaluate_counts_correct_predictions() -> None:
    dataset = _blobs(30)  # labels 0, 1, 2 repeating: a third each
    assert evaluate(Constant(1), dataset) == pytest.approx(1 / 3)
    assert evaluate(Constant(0), ListDataset(dataset), batch_size=7) == pytest.approx(1 / 3)


def test_evaluate_uses_eval_mode_without_grad_and_restores_modes() -> None:
    model = Constant(2)
    model.train()
    model.bn.eval()
    running_mean = model.bn.running_mean.clone()
    evaluate(model, _blobs(30), batch_size=8)
    assert model.grad_seen == [False] * 4
    assert model.training
    assert not model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)
    model.bn.train()
    evaluate(model, _blobs(30))
    assert model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)


def test_evaluate_rejects_an_empty_dataset() -> None:
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="the dataset is empty"):
        evaluate(Constant(0), empty)
