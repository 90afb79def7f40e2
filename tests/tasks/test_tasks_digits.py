"""The default task: scikit-learn's digits, its splits, its model and its training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantsearch.tasks import (
    DigitsCNN,
    Task,
    TaskError,
    TrainConfig,
    available_tasks,
    evaluate,
    fit,
    get_task,
    make_optimizer,
    seed_everything,
)


@pytest.fixture(scope="module")
def digits() -> Task:
    return get_task("digits", seed=0)


def _train(task: Task, config: TrainConfig, seed: int) -> tuple[nn.Module, float]:
    seed_everything(seed)
    model = task.build_model()
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=seed)
    return model, result.val_accuracy


def _rows(dataset: torch.utils.data.TensorDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset.tensors[0]}


def test_available_tasks_lists_the_builtins() -> None:
    assert available_tasks() == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar10-bnn"]


def test_digits_is_the_default_task() -> None:
    assert get_task().name == "digits"


def test_digits_splits_are_70_15_15_disjoint_and_cover_everything(digits: Task) -> None:
    sizes = [len(digits.train_set), len(digits.val_set), len(digits.test_set)]
    assert sizes == [1257, 270, 270]
    train, val, test = (_rows(s) for s in (digits.train_set, digits.val_set, digits.test_set))
    assert not train & val
    assert not train & test
    assert not val & test
    assert len(train | val | test) == 1797
    inputs = digits.train_set.tensors[0]
    assert inputs.dtype == torch.float32
    assert tuple(inputs.shape[1:]) == (1, 8, 8)
    assert float(inputs.min()) == 0.0
    assert float(inputs.max()) == 1.0
    assert digits.train_set.tensors[1].dtype == torch.int64
    assert tuple(digits.dummy_input.shape) == (1, 1, 8, 8)
    assert torch.equal(digits.dummy_input[0], inputs[0])
    assert digits.num_classes == 10


def test_digits_splits_are_stratified(digits: Task) -> None:
    counts = torch.bincount(digits.test_set.tensors[1], minlength=10)
    assert int(counts.min()) >= 26
    assert int(counts.max()) <= 28


def test_digits_split_depends_on_the_seed_only(digits: Task) -> None:
    again = get_task("digits", seed=0)
    other = get_task("digits", seed=1)
    assert torch.equal(again.test_set.tensors[0], digits.test_set.tensors[0])
    assert not torch.equal(other.test_set.tensors[0], digits.test_set.tensors[0])


def test_digits_options_change_the_split_and_limit_the_training_set() -> None:
    task = get_task("digits", options={"val_fraction": 0.2, "test_fraction": 0.1, "limit": 100})
    assert [len(task.train_set), len(task.val_set), len(task.test_set)] == [100, 360, 180]


def test_digits_model_has_readable_layer_names(digits: Task) -> None:
    model = digits.build_model()
    assert isinstance(model, DigitsCNN)
    names = {name: type(module).__name__ for name, module in model.named_modules() if name}
    assert names == {
        "conv1": "Conv2d",
        "bn1": "BatchNorm2d",
        "relu1": "ReLU6",
        "conv2": "Conv2d",
        "bn2": "BatchNorm2d",
        "relu2": "ReLU6",
        "pool": "MaxPool2d",
        "flatten": "Flatten",
        "fc1": "Linear",
        "relu3": "ReLU6",
        "fc2": "Linear",
    }
    assert tuple(model(digits.dummy_input).shape) == (1, 10)


def test_digits_trains_to_high_accuracy_with_the_default_config(digits: Task) -> None:
    model, val_accuracy = _train(digits, TrainConfig(), seed=0)
    assert val_accuracy >= 0.95
    assert evaluate(model, digits.test_set) >= 0.94


def test_digits_task_config_trains_better_still(digits: Task) -> None:
    config = digits.default_train_config
    assert (config.epochs, config.lr) == (5, 3e-3)
    model, val_accuracy = _train(digits, config, seed=0)
    assert val_accuracy >= 0.97
    assert evaluate(model, digits.test_set) >= 0.96


def test_same_seed_gives_identical_weights_and_accuracy(digits: Task) -> None:
    config = TrainConfig(epochs=1)
    first, first_accuracy = _train(digits, config, seed=3)
    second, second_accuracy = _train(digits, config, seed=3)
    third, _ = _train(digits, config, seed=4)
    assert first_accuracy == second_accuracy
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.conv1.weight, third.conv1.weight)


def test_unknown_option_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(TaskError) as info:
        get_task("digits", options={"epochs": 3})
    assert str(info.value) == (
        "digits: unknown option 'epochs'; allowed options: limit, model, test_fraction, "
        "val_fraction"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"val_fraction": 1.5}, "option 'val_fraction' must be a number between 0 and 1, got 1.5"),
        ({"limit": 0}, "option 'limit' must be a positive integer, got 0"),
        ({"limit": True}, "option 'limit' must be a positive integer, got True"),
        ({"model": "resnet"}, "option 'model' must be one of cnn, got 'resnet'"),
        (
            {"val_fraction": 0.5, "test_fraction": 0.5},
            "val_fraction + test_fraction must be below 1, got 0.5 + 0.5",
        ),
    ],
)
def test_bad_option_values_are_rejected(options: dict[str, object], message: str) -> None:
    with pytest.raises(TaskError, match=r"^digits: ") as info:
        get_task("digits", options=options)
    assert message in str(info.value)


def test_unknown_task_suggests_a_close_name() -> None:
    with pytest.raises(TaskError) as info:
        get_task("digit")
    message = str(info.value)
    assert message.startswith("unknown task 'digit' (did you mean 'digits'?)")
    assert "built-in tasks: digits, mnist, fashion-mnist, cifar10, cifar10-bnn" in message
    assert "'package.module:function' or 'path/to/file.py:function'" in message


def test_task_errors_are_value_errors() -> None:
    assert issubclass(TaskError, ValueError)
    with pytest.raises(TaskError, match="task options must be a mapping, got list"):
        get_task("digits", options=["limit"])  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="seed must be an integer, got '1'"):
        get_task("digits", seed="1")  # type: ignore[arg-type]
