"""Task: what a trial trains and evaluates. Built-in tasks and user-task loading."""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from quantsearch.tasks import _data
from quantsearch.tasks._errors import TaskError
from quantsearch.tasks._models import CifarSmallCNN, DigitsCNN, MnistCNN, VGG_Cifar10
from quantsearch.tasks._training import TrainConfig

__all__ = ["USER_TASK_FUNCTION", "Task", "available_tasks", "get_task"]

# The function name looked up when a user task is given as a bare "path/to/file.py".
USER_TASK_FUNCTION = "make_task"


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
# User tasks


def _is_user_spec(name: str) -> bool:
    return ":" in name or name.endswith(".py")


def _split_user_spec(spec: str) -> tuple[str, str, bool]:
    """``(target, attribute, is_file)`` of a user task name: a module or a file, a function."""
    target, colon, attribute = spec.rpartition(":")
    if not colon:
        target, attribute = spec, USER_TASK_FUNCTION
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    return target, attribute, is_file


def user_task_file(name: str) -> tuple[str, str] | None:
    """The file of a user task named ``path/to/file.py:function`` (or ``file.py``) and the rest
    of the name (``:function``, or ``""``); None for a built-in task or a module's."""
    name = name.strip()
    if name.lower().replace("_", "-") in _BUILTINS or not _is_user_spec(name):
        return None
    target, _, is_file = _split_user_spec(name)
    if not is_file or not target:
        return None
    return target, name[len(target) :]


def _import_file(path: Path, spec: str) -> ModuleType:
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise TaskError(f"user task {spec!r}: file {resolved} does not exist")
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_name = f"quantsearch_user_task_{resolved.stem}_{digest}"
    cached = sys.modules.get(module_name)
    if cached is not None and getattr(cached, "__file__", None) == str(resolved):
        return cached
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise TaskError(f"user task {spec!r}: {resolved} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    # The file's own folder is importable while it loads, for helper modules beside it.
    sys.path.insert(0, str(resolved.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise TaskError(
            f"user task {spec!r}: importing {resolved} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        sys.path.remove(str(resolved.parent))
    return module


def _import_module(module_name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(f"{exc.name}.")
        ):
            raise TaskError(
                f"user task {spec!r}: no module named {module_name!r} (is it installed or on "
                "PYTHONPATH? a file is given as 'path/to/file.py:function')"
            ) from exc
        raise TaskError(
            f"user task {spec!r}: importing {module_name!r} failed: ModuleNotFoundError: {exc}"
        ) from exc
    except Exception as exc:
        raise TaskError(
            f"user task {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _resolve_factory(spec: str) -> Callable[..., Any]:
    target, attribute, is_file = _split_user_spec(spec)
    if not target or not attribute:
        raise TaskError(
            f"user task {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'"
        )
    module = _import_file(Path(target), spec) if is_file else _import_module(target, spec)
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            close = difflib.get_close_matches(attribute, public, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TaskError(
                f"user task {spec!r}: {module.__name__ if not is_file else target} has no "
                f"attribute {attribute!r}{hint}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise TaskError(
            f"user task {spec!r}: {attribute!r} is a {type(factory).__name__}, not a function"
        )
    return factory


def _call_factory(
    spec: str, factory: Callable[..., Any], data_dir: Path | None, options: dict, seed: int
) -> Any:
    kwargs = {"data_dir": data_dir, "options": options, "seed": seed}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise TaskError(
            f"user task {spec!r}: the function must accept the keyword arguments data_dir, "
            f"options and seed ({exc})"
        ) from exc
    except ValueError:
        pass  # no signature to inspect (some builtins): just call it
    try:
        return factory(**kwargs)
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"user task {spec!r} raised {type(exc).__name__}: {exc}") from exc


def _check_user_task(spec: str, task: Any) -> Task:
    where = f"user task {spec!r}"
    if not isinstance(task, Task):
        raise TaskError(f"{where}: returned a {type(task).__name__}, not a quantsearch.tasks.Task")
    if not isinstance(task.name, str) or not task.name:
        raise TaskError(f"{where}: Task.name must be a non-empty string, got {task.name!r}")
    if not callable(task.build_model):
        raise TaskError(f"{where}: Task.build_model must be callable")
    if (
        isinstance(task.num_classes, bool)
        or not isinstance(task.num_classes, int)
        or (task.num_classes < 2)
    ):
        raise TaskError(
            f"{where}: Task.num_classes must be an integer >= 2, got {task.num_classes!r}"
        )
    if not isinstance(task.default_train_config, TrainConfig):
        raise TaskError(f"{where}: Task.default_train_config must be a TrainConfig")
    for split in ("train_set", "val_set", "test_set"):
        dataset = getattr(task, split)
        try:
            size = len(dataset)
        except TypeError:
            raise TaskError(f"{where}: Task.{split} must be a Dataset with a length") from None
        if size == 0:
            raise TaskError(f"{where}: Task.{split} is empty")
    if task.pretrained is not None and not isinstance(task.pretrained, str | Path | Mapping):
        raise TaskError(
            f"{where}: Task.pretrained must be a state-dict file path or a state dict, got a "
            f"{type(task.pretrained).__name__}"
        )
    if not isinstance(task.dummy_input, Tensor) or task.dummy_input.dim() == 0:
        raise TaskError(f"{where}: Task.dummy_input must be a batch tensor, e.g. train_x[:1]")
    with torch.random.fork_rng(devices=[]):
        try:
            model = task.build_model()
        except Exception as exc:
            raise TaskError(f"{where}: build_model() raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"{where}: build_model() returned a {type(model).__name__}, not a torch.nn.Module"
            )
        model.eval()
        try:
            with torch.no_grad():
                output = model(task.dummy_input)
        except Exception as exc:
            raise TaskError(
                f"{where}: the model fails on dummy_input of shape "
                f"{tuple(task.dummy_input.shape)}: {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] != task.num_classes:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TaskError(
            f"{where}: the model should return (batch, {task.num_classes}) class scores for "
            f"dummy_input, got {shape}"
        )
    return task


def _load_user_task(
    spec: str, data_dir: Path | None, options: Mapping[str, Any] | None, seed: int
) -> Task:
    factory = _resolve_factory(spec)
    task = _call_factory(spec, factory, data_dir, dict(options or {}), seed)
    return _check_user_task(spec, task)


# ---------------------------------------------------------------------------------------------


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
    if _is_user_spec(name):
        return _load_user_task(name, directory, options, seed)
    close = difflib.get_close_matches(key, list(_BUILTINS), n=2)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise TaskError(
        f"unknown task {name!r}{hint}; built-in tasks: {', '.join(_BUILTINS)}; a task of your "
        "own is named 'package.module:function' or 'path/to/file.py:function'"
    )
