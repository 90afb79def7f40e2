"""User tasks: a function of the user's, in a module or a file, that returns a Task."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from quantsearch.tasks._contract import Task, TaskMetric, call_model
from quantsearch.tasks._errors import TaskError
from quantsearch.tasks._time_limit import TaskTimeoutError, time_limit
from quantsearch.tasks._train_config import TrainConfig

__all__ = ["USER_TASK_FUNCTION", "is_user_spec", "load_user_task", "split_user_spec"]

# The function name looked up when a user task is given as a bare "path/to/file.py".
USER_TASK_FUNCTION = "make_task"

# Spawned worker processes re-import a script as __mp_main__, running only its top level.
_MAIN_HINT = (
    " (a task named '__main__:function' must be defined at the top level of a script run as "
    "a file, outside `if __name__ == \"__main__\":`, so that the spawned worker processes of "
    "--jobs/jobs= re-import it; from a notebook, `python -c` or stdin, put the function in a "
    "file and name it 'path/to/file.py:function')"
)




def is_user_spec(name: str) -> bool:
    return ":" in name or name.endswith(".py")


def split_user_spec(spec: str) -> tuple[str, str, bool]:
    """``(target, attribute, is_file)`` of a user task name: a module or a file, a function."""
    target, colon, attribute = spec.rpartition(":")
    if not colon:
        target, attribute = spec, USER_TASK_FUNCTION
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    return target, attribute, is_file


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
    except TaskTimeoutError:
        raise
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
    except TaskTimeoutError:
        raise
    except Exception as exc:
        raise TaskError(
            f"user task {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _resolve_factory(spec: str) -> Callable[..., Any]:
    target, attribute, is_file = split_user_spec(spec)
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
            if target == "__main__":
                hint += _MAIN_HINT
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
    except TaskTimeoutError:
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
    if task.num_classes is not None and (
        isinstance(task.num_classes, bool)
        or not isinstance(task.num_classes, int)
        or (task.num_classes < 2)
    ):
        raise TaskError(
            f"{where}: Task.num_classes must be an integer >= 2, got {task.num_classes!r} "
            "(None for a task that is not a classifier)"
        )
    _check_hooks(where, task)
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
    if task.dummy_input is None or (
        isinstance(task.dummy_input, Tensor) and task.dummy_input.dim() == 0
    ):
        raise TaskError(
            f"{where}: Task.dummy_input must be one input of the model: a batch tensor (e.g. "
            "train_x[:1]), a tuple of positional arguments or a dict of keyword arguments"
        )
    with torch.random.fork_rng(devices=[]):
        try:
            model = task.build_model()
        except TaskTimeoutError:
            raise
        except Exception as exc:
            raise TaskError(f"{where}: build_model() raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"{where}: build_model() returned a {type(model).__name__}, not a torch.nn.Module"
            )
        model.eval()
        try:
            with torch.no_grad():
                output = call_model(model, task.dummy_input)
        except TaskTimeoutError:
            raise
        except Exception as exc:
            raise TaskError(
                f"{where}: the model fails on dummy_input {_shape_text(task.dummy_input)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if task.num_classes is None or not task.is_classifier:
        return task
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] != task.num_classes:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TaskError(
            f"{where}: the model should return (batch, {task.num_classes}) class scores for "
            f"dummy_input, got {shape}"
        )
    return task


def _shape_text(value: Any) -> str:
    """``of shape (1, 8)``, or the structure of a tuple or dict input."""
    if isinstance(value, Tensor):
        return f"of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_shape_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_shape_text(v) for v in value) + ")"
    return f"a {type(value).__name__}"


_HOOKS = ("loss", "training_routine", "evaluate", "forward", "collate_fn")


def _check_hooks(where: str, task: Task) -> None:
    """The task's own functions are callables, its metrics TaskMetrics with distinct names."""
    for hook in _HOOKS:
        value = getattr(task, hook)
        if value is not None and not callable(value):
            raise TaskError(f"{where}: Task.{hook} must be a function, got {value!r}")
    if task.num_classes is None and task.evaluate is None and task.metrics:
        raise TaskError(f"{where}: Task.metrics are declared but Task.evaluate is not given")
    names: set[str] = set()
    for metric in task.metrics:
        if not isinstance(metric, TaskMetric):
            raise TaskError(
                f"{where}: Task.metrics must hold TaskMetric(name, direction) entries, got "
                f"{metric!r}"
            )
        if metric.name in names:
            raise TaskError(f"{where}: metric {metric.name!r} is declared twice")
        names.add(metric.name)


def load_user_task(
    spec: str, data_dir: Path | None, options: Mapping[str, Any] | None, seed: int
) -> Task:
    # Importing the file, calling the function and the first forward pass are the user's code.
    with time_limit(f"the task function {spec}"):
        factory = _resolve_factory(spec)
        task = _call_factory(spec, factory, data_dir, dict(options or {}), seed)
        return _check_user_task(spec, task)
