"""User tasks: 'path/to/file.py:function' and 'package.module:function', and their errors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from quantsearch.tasks import (
    Task,
    TaskError,
    evaluate,
    fit,
    get_task,
    make_optimizer,
    seed_everything,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "user_task.py"

TASK_FILE = """
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from quantsearch.tasks import Task


def _blobs(n, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    inputs = torch.eye(3, 4)[labels] * 4 + torch.randn(n, 4, generator=generator)
    return TensorDataset(inputs, labels)


def make_task(*, data_dir, options, seed):
    return Task(
        name=f"blobs seed={seed} dir={data_dir} options={sorted(options.items())}",
        build_model=lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU6(), nn.Linear(16, 3)),
        train_set=_blobs(60, seed),
        val_set=_blobs(30, seed + 1),
        test_set=_blobs(30, seed + 2),
        dummy_input=torch.zeros(1, 4),
        num_classes=3,
    )
"""


def _write(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def test_the_example_user_task_loads_and_trains() -> None:
    task = get_task(f"{EXAMPLE}:make_task", options={"hidden": 16}, seed=0)
    assert task.name == "wine"
    assert task.num_classes == 3
    assert [len(task.train_set), len(task.val_set), len(task.test_set)] == [106, 36, 36]
    config = task.default_train_config
    seed_everything(0)
    model = task.build_model()
    assert model.fc1.out_features == 16
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
    assert result.val_accuracy >= 0.9
    assert evaluate(model, task.test_set) >= 0.9


def test_the_example_rejects_unknown_options() -> None:
    with pytest.raises(TaskError, match=r"wine: unknown option\(s\) \['depth'\]"):
        get_task(f"{EXAMPLE}:make_task", options={"depth": 3})


def test_a_task_file_gets_data_dir_options_and_seed(tmp_path: Path) -> None:
    path = _write(tmp_path, "blobs_task.py", TASK_FILE)
    task = get_task(f"{path}:make_task", data_dir=tmp_path / "d", options={"k": 1}, seed=4)
    assert isinstance(task, Task)
    assert task.name == f"blobs seed=4 dir={tmp_path / 'd'} options=[('k', 1)]"
    model = task.build_model()
    config = task.default_train_config
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
    assert 0.0 <= result.val_accuracy <= 1.0
    # Without a function name the file's make_task is used; no data_dir gives None.
    assert get_task(str(path)).name == "blobs seed=0 dir=None options=[]"


def test_a_task_in_an_importable_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "qs_user_tasks_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _write(package, "blobs.py", TASK_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        task = get_task("qs_user_tasks_pkg.blobs:make_task", seed=2)
    finally:
        for name in ("qs_user_tasks_pkg", "qs_user_tasks_pkg.blobs"):
            sys.modules.pop(name, None)
    assert task.name == "blobs seed=2 dir=None options=[]"


def test_a_missing_module_is_named() -> None:
    with pytest.raises(TaskError) as info:
        get_task("qs_no_such_package.tasks:make_task")
    assert str(info.value) == (
        "user task 'qs_no_such_package.tasks:make_task': no module named "
        "'qs_no_such_package.tasks' (is it installed or on PYTHONPATH? a file is given as "
        "'path/to/file.py:function')"
    )


def test_a_missing_dependency_of_the_module_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "needs_dep.py", "import qs_absent_dependency\n")
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:make_task")
    assert str(info.value) == (
        f"user task '{path}:make_task': importing {path} failed: ModuleNotFoundError: "
        "No module named 'qs_absent_dependency'"
    )


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.py"
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:make_task")
    assert str(info.value) == f"user task '{path}:make_task': file {path} does not exist"


def test_a_missing_function_suggests_a_close_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "blobs_task.py", TASK_FILE)
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:make_tsak")
    assert str(info.value) == (
        f"user task '{path}:make_tsak': {path} has no attribute 'make_tsak'; "
        "did you mean make_task?"
    )


def test_the_target_must_be_callable(tmp_path: Path) -> None:
    path = _write(tmp_path, "value.py", "make_task = 3\n")
    with pytest.raises(TaskError, match=r"'make_task' is a int, not a function$"):
        get_task(f"{path}:make_task")


def test_the_function_must_take_the_documented_keywords(tmp_path: Path) -> None:
    path = _write(tmp_path, "positional.py", "def make_task(seed):\n    return None\n")
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:make_task")
    assert str(info.value).startswith(
        f"user task '{path}:make_task': the function must accept the keyword arguments "
        "data_dir, options and seed ("
    )


def test_the_function_must_return_a_task(tmp_path: Path) -> None:
    body = "def make_task(*, data_dir, options, seed):\n    return {'name': 'x'}\n"
    path = _write(tmp_path, "returns_dict.py", body)
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:make_task")
    assert str(info.value) == (
        f"user task '{path}:make_task': returned a dict, not a quantsearch.tasks.Task"
    )


def test_an_exception_in_the_function_becomes_a_task_error(tmp_path: Path) -> None:
    body = "def make_task(**kwargs):\n    raise FileNotFoundError('no data here')\n"
    path = _write(tmp_path, "raises.py", body)
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:make_task")
    assert str(info.value) == (
        f"user task '{path}:make_task' raised FileNotFoundError: no data here"
    )
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_an_import_error_in_the_file_becomes_a_task_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.py", "def make_task(:\n")
    with pytest.raises(TaskError, match=r"importing .*broken\.py failed: SyntaxError: "):
        get_task(f"{path}:make_task")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "num_classes=5",
            "the model should return (batch, 5) class scores for dummy_input, got (1, 3)",
        ),
        ("dummy_input=torch.zeros(1, 7)", "the model fails on dummy_input of shape (1, 7): "),
        ("num_classes=1", "Task.num_classes must be an integer >= 2, got 1"),
        ("val_set=TensorDataset(torch.zeros(0, 4), torch.zeros(0))", "Task.val_set is empty"),
        ("build_model=lambda: 'model'", "build_model() returned a str, not a torch.nn.Module"),
    ],
)
def test_an_unusable_task_is_rejected(tmp_path: Path, change: str, message: str) -> None:
    body = (
        TASK_FILE
        + f"""

def broken(*, data_dir, options, seed):
    import dataclasses
    return dataclasses.replace(make_task(data_dir=data_dir, options=options, seed=seed), {change})
"""
    )
    path = _write(tmp_path, "unusable.py", body)
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:broken")
    assert str(info.value).startswith(f"user task '{path}:broken': {message}")
