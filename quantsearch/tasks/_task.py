"""The built-in tasks, and get_task: a task by its name (built-in or the user's)."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from quantsearch.tasks import _data
from quantsearch.tasks._contract import Task
from quantsearch.tasks._errors import TaskError
from quantsearch.tasks._models import CifarSmallCNN, DigitsCNN, MnistCNN, VGG_Cifar10
from quantsearch.tasks._train_config import TrainConfig
from quantsearch.tasks._user_task import is_user_spec, load_user_task, split_user_spec

__all__ = ["available_tasks", "get_task", "user_task_file"]



# ---------------------------------------------------------------------------------------------
# Options


def _check_fraction(task: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise TaskError(f"{task}: option '{key}' must be a number between 0 and 1, got {value!r}")
    return float(value)


def _check_count(task: str, key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskError(f"{task}: option '{key}' must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class _Builtin:
    make: Callable[[str, Path, dict[str, Any], int], Task]
    models: Mapping[str, Callable[[int], nn.Module]]
    defaults: Mapping[str, Any]
    data_name: str


def _parse_options(
    name: str, builtin: _Builtin, options: Mapping[str, Any] | None
) -> dict[str, Any]:
    given = dict(options or {})
    unknown = sorted(set(given) - set(builtin.defaults))
    if unknown:
        raise TaskError(
            f"{name}: unknown option {', '.join(map(repr, unknown))}; "
            f"allowed options: {', '.join(sorted(builtin.defaults))}"
        )
    parsed = {**builtin.defaults, **given}
    if parsed["model"] not in builtin.models:
        raise TaskError(
            f"{name}: option 'model' must be one of {', '.join(builtin.models)}, "
            f"got {parsed['model']!r}"
        )
    for key in ("val_fraction", "test_fraction"):
        if key in parsed:
            parsed[key] = _check_fraction(name, key, parsed[key])
    if parsed.get("val_fraction", 0) + parsed.get("test_fraction", 0) >= 1:
        raise TaskError(
            f"{name}: val_fraction + test_fraction must be below 1, got "
            f"{parsed['val_fraction']} + {parsed['test_fraction']}"
        )
    for key in ("limit", "eval_limit"):
        if key in parsed:
            parsed[key] = _check_count(name, key, parsed[key])
    return parsed


# ---------------------------------------------------------------------------------------------
# Built-in tasks


def _tensor_set(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def _limited(indices: np.ndarray, limit: int | None) -> np.ndarray:
    return indices if limit is None else indices[:limit]


def _check_sizes(name: str, **sizes: int) -> None:
    empty = [split for split, size in sizes.items() if size == 0]
    if empty:
        raise TaskError(
            f"{name}: the {' and '.join(empty)} split(s) came out empty "
            f"({', '.join(f'{split}={size}' for split, size in sizes.items())}); "
            "more examples or larger fractions are needed"
        )


def _make_digits(name: str, data_dir: Path, opts: dict[str, Any], seed: int) -> Task:
    images, labels = _data.load_digits()
    rest, test = _data.split_indices(labels, opts["test_fraction"], seed)
    # The validation fraction is of the whole set, so the split sizes read as given.
    val_of_rest = opts["val_fraction"] / (1 - opts["test_fraction"])
    train_pos, val_pos = _data.split_indices(labels[rest], val_of_rest, seed)
    train, val = _limited(rest[train_pos], opts["limit"]), rest[val_pos]
    _check_sizes(name, train=len(train), val=len(val), test=len(test))
    images = images[:, None, :, :]
    model = _MODELS[name][opts["model"]]
    return Task(
        name=name,
        build_model=functools.partial(model, 10),
        train_set=_tensor_set(images[train], labels[train]),
        val_set=_tensor_set(images[val], labels[val]),
        test_set=_tensor_set(images[test], labels[test]),
        dummy_input=torch.from_numpy(images[train[:1]].copy()),
        num_classes=10,
        default_train_config=TrainConfig(epochs=5, lr=3e-3),
        description="scikit-learn's 8x8 handwritten digits (1,797 images), small CNN",
    )


# Per-dataset pixel mean and standard deviation (of the training images, pixels in [0, 1]).
_IDX_NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
_IDX_SUBDIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _idx_images(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    scaled = images[:, None, :, :].astype(np.float32) / 255.0
    return (scaled - np.float32(mean)) / np.float32(std)


def _cifar_images(images: np.ndarray) -> np.ndarray:
    mean = np.asarray(_CIFAR_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.asarray(_CIFAR_STD, dtype=np.float32)[None, :, None, None]
    return (images.astype(np.float32) / 255.0 - mean) / std


def _split_train(
    name: str,
    train_y: np.ndarray,
    test_y: np.ndarray,
    opts: dict[str, Any],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train, val = _data.split_indices(train_y, opts["val_fraction"], seed)
    train = _limited(train, opts["limit"])
    val = _limited(val, opts["eval_limit"])
    test = _limited(np.arange(len(test_y)), opts["eval_limit"])
    _check_sizes(name, train=len(train), val=len(val), test=len(test))
    return train, val, test


def _make_idx(name: str, data_dir: Path, opts: dict[str, Any], seed: int) -> Task:
    train_x, train_y, test_x, test_y = _data.load_idx_dataset(name, data_dir, _IDX_SUBDIRS[name])
    train, val, test = _split_train(name, train_y, test_y, opts, seed)
    mean, std = _IDX_NORMALIZATION[name]
    model = _MODELS[name][opts["model"]]
    return Task(
        name=name,
        build_model=functools.partial(model, 10),
        train_set=_tensor_set(_idx_images(train_x[train], mean, std), train_y[train]),
        val_set=_tensor_set(_idx_images(train_x[val], mean, std), train_y[val]),
        test_set=_tensor_set(_idx_images(test_x[test], mean, std), test_y[test]),
        dummy_input=torch.from_numpy(_idx_images(train_x[train[:1]], mean, std)),
        num_classes=10,
        description=f"{name} 28x28 images from {data_dir}, the QAT example's CNN",
    )


def _make_cifar10(name: str, data_dir: Path, opts: dict[str, Any], seed: int) -> Task:
    train_x, train_y, test_x, test_y = _data.load_cifar10(data_dir)
    train, val, test = _split_train(name, train_y, test_y, opts, seed)
    model_name = opts["model"]
    config = TrainConfig()
    if model_name == "vgg_bnn":
        # The BNN example trains with Adam at lr 1e-2 and batch 64, dividing the rate as it goes.
        config = TrainConfig(epochs=10, lr=1e-2, lr_schedule="step", device="auto")
    return Task(
        name=name,
        build_model=functools.partial(_MODELS[name][model_name], 10),
        train_set=_tensor_set(_cifar_images(train_x[train]), train_y[train]),
        val_set=_tensor_set(_cifar_images(train_x[val]), train_y[val]),
        test_set=_tensor_set(_cifar_images(test_x[test]), test_y[test]),
        dummy_input=torch.from_numpy(_cifar_images(train_x[train[:1]])),
        num_classes=10,
        default_train_config=config,
        description=f"CIFAR-10 from {data_dir}, model {model_name}",
    )


_CIFAR_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "vgg_bnn": VGG_Cifar10,
    "small": CifarSmallCNN,
}
_MODELS: dict[str, dict[str, Callable[[int], nn.Module]]] = {
    "digits": {"cnn": DigitsCNN},
    "mnist": {"cnn": MnistCNN},
    "fashion-mnist": {"cnn": MnistCNN},
    "cifar10": _CIFAR_MODELS,
    "cifar10-bnn": {"vgg_bnn": VGG_Cifar10},
}
_SPLIT_DEFAULTS = {"val_fraction": 0.1, "limit": None, "eval_limit": None}
_BUILTINS: dict[str, _Builtin] = {
    "digits": _Builtin(
        _make_digits,
        _MODELS["digits"],
        {"model": "cnn", "val_fraction": 0.15, "test_fraction": 0.15, "limit": None},
        data_name="digits",
    ),
    "mnist": _Builtin(
        _make_idx, _MODELS["mnist"], {"model": "cnn", **_SPLIT_DEFAULTS}, data_name="mnist"
    ),
    "fashion-mnist": _Builtin(
        _make_idx,
        _MODELS["fashion-mnist"],
        {"model": "cnn", **_SPLIT_DEFAULTS},
        data_name="fashion-mnist",
    ),
    "cifar10": _Builtin(
        _make_cifar10, _CIFAR_MODELS, {"model": "vgg_bnn", **_SPLIT_DEFAULTS}, data_name="cifar10"
    ),
    "cifar10-bnn": _Builtin(
        _make_cifar10,
        _MODELS["cifar10-bnn"],
        {"model": "vgg_bnn", **_SPLIT_DEFAULTS},
        data_name="cifar10",
    ),
}


def available_tasks() -> list[str]:
    """The built-in task names; a user task is named "pkg.module:function" or "file.py:function"."""
    return list(_BUILTINS)


# ---------------------------------------------------------------------------------------------


def user_task_file(name: str) -> tuple[str, str] | None:
    """The file of a user task named ``path/to/file.py:function`` (or ``file.py``) and the rest
    of the name (``:function``, or ``""``); None for a built-in task or a module's."""
    name = name.strip()
    if name.lower().replace("_", "-") in _BUILTINS or not is_user_spec(name):
        return None
    target, _, is_file = split_user_spec(name)
    if not is_file or not target:
        return None
    return target, name[len(target) :]


def get_task(
    name: str = "digits",
    *,
    data_dir: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Task:
    """Build the task ``name`` with its data split from ``seed``.

    ``name`` is a built-in task (see :func:`available_tasks`) or a user task:
    ``"package.module:function"`` or ``"path/to/file.py:function"`` (a bare ``file.py`` means
    ``file.py:make_task``). The function is called as
    ``function(data_dir=Path | None, options=dict, seed=int)`` and must return a :class:`Task`.
    A built-in task without ``data_dir`` reads ``./data/<name>``. Raises TaskError for an
    unknown name, a bad option, or missing or malformed data.
    """
    if not isinstance(name, str) or not name.strip():
        raise TaskError(f"a task name must be a non-empty string, got {name!r}")
    if options is not None and not isinstance(options, Mapping):
        raise TaskError(f"task options must be a mapping, got {type(options).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TaskError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    name = name.strip()
    key = name.lower().replace("_", "-")
    if key in _BUILTINS:
        builtin = _BUILTINS[key]
        opts = _parse_options(key, builtin, options)
        if directory is None:
            directory = Path("data") / builtin.data_name
        return builtin.make(key, directory, opts, seed)
    if is_user_spec(name):
        return load_user_task(name, directory, options, seed)
    close = difflib.get_close_matches(key, list(_BUILTINS), n=2)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise TaskError(
        f"unknown task {name!r}{hint}; built-in tasks: {', '.join(_BUILTINS)}; a task of your "
        "own is named 'package.module:function' or 'path/to/file.py:function'"
    )
