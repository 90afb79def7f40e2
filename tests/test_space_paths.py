"""Paths written in a space file are relative to its folder; command-line paths and defaults
are relative to the working folder (issue 10)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from quantsearch.cli import main
from quantsearch.search import load_space, open_study, parse_space, prepare
from quantsearch.tasks import get_task
from tests.search._spaces import SMALL_SPACE
from tests.tasks.conftest import write_mnist_files

MINIMAL = {"algorithm": "qat", "params": {"quant_bits": {"_type": "choice", "_value": [4, 8]}}}



def _write(path: Path, space: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """``proj/`` (the space goes in ``proj/spaces/``) and ``cwd/``, the working folder."""
    project, cwd = tmp_path / "proj", tmp_path / "cwd"
    (project / "spaces").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return project, cwd


def _save_digits_weights(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(get_task("digits", options={"limit": 300}).build_model().state_dict(), path)


# --- Parsing ------------------------------------------------------------------------------


def test_relative_paths_in_a_space_file_are_relative_to_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, _ = _layout(tmp_path, monkeypatch)
    space = {
        **MINIMAL,
        "task": {"name": "digits", "data_dir": "../data", "pretrained": "weights/m.pt"},
        "storage": "../studies/s.db",
    }
    path = _write(project / "spaces" / "s.yaml", space)
    spec = load_space(path)  # named by its absolute path: absolute paths
    assert spec.task.data_dir == str(project / "data")
    assert spec.task.pretrained == str(project / "spaces" / "weights" / "m.pt")
    assert spec.storage == f"sqlite:///{project / 'studies' / 's.db'}"
    relative = load_space("../proj/spaces/s.yaml")  # named relative to the working folder
    assert relative.task.data_dir == "../proj/data"
    assert relative.task.pretrained == "../proj/spaces/weights/m.pt"
    assert relative.storage == "sqlite:///../proj/studies/s.db"
    # The hash is of the paths as written: the same wherever the study is run from, and what
    # it was when spaces were read from the working folder.
    old = parse_space(space, source="s.yaml", default_name="s")
    assert spec.space_hash == relative.space_hash == old.space_hash
    assert spec.search_dict() == old.search_dict()
    assert spec.changed_from(spec.to_dict()) == []
    assert spec.changed_from(relative.to_dict()) == []


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("db/s.db", "sqlite:///{folder}/db/s.db"),
        ("sqlite:///db/s.db", "sqlite:///{folder}/db/s.db"),
        ("sqlite:///db/s.db?timeout=5", "sqlite:///{folder}/db/s.db?timeout=5"),
        ("sqlite+pysqlite:///s.db", "sqlite+pysqlite:///{folder}/s.db"),
        ("/abs/s.db", "sqlite:////abs/s.db"),
        ("sqlite:////abs/s.db", "sqlite:////abs/s.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite://", "sqlite://"),
        ("postgresql://user:secret@host/db", "postgresql://user:secret@host/db"),
    ],
)
def test_a_storage_in_a_space_file_is_relative_to_its_folder(
    tmp_path: Path, storage: str, expected: str
) -> None:
    path = _write(tmp_path / "spaces" / "s.yaml", {**MINIMAL, "storage": storage})
    assert load_space(path).storage == expected.format(folder=tmp_path / "spaces")


def test_a_space_read_from_a_pipe_keeps_the_working_folder(tmp_path: Path) -> None:
    fifo = tmp_path / "space.fifo"
    os.mkfifo(fifo)
    text = yaml.safe_dump({**MINIMAL, "storage": "runs/s.db"})
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    try:
        spec = load_space(fifo)
    finally:
        writer.join()
    assert spec.storage == "sqlite:///runs/s.db"


def test_absolute_and_home_paths_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    task = {"name": "digits", "data_dir": "~/data", "pretrained": "/abs/w.pt"}
    path = _write(tmp_path / "spaces" / "s.yaml", {**MINIMAL, "task": task, "storage": "~/s.db"})
    spec = load_space(path)
    assert spec.task.data_dir == str(tmp_path / "home" / "data")
    assert spec.task.pretrained == "/abs/w.pt"
    assert spec.task.written == {}
    assert spec.storage == f"sqlite:///{tmp_path / 'home' / 's.db'}"


def test_defaults_and_command_line_paths_are_relative_to_the_working_folder(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "spaces" / "s.yaml", {**MINIMAL, "task": {"name": "digits"}})
    spec = load_space(path)
    assert spec.storage == "sqlite:///studies/s.db"  # the default: studies/<study_name>.db
    assert spec.task.data_dir is None  # get_task's default, ./data/<name>
    given = spec.with_overrides(storage="runs/o.db", data_dir="here/data")
    assert given.storage == "sqlite:///runs/o.db"
    assert given.task.data_dir == "here/data"
    assert given.space_hash == spec.space_hash


def test_a_space_not_read_from_a_file_keeps_its_paths_unless_given_a_base(
    tmp_path: Path,
) -> None:
    task = {"name": "digits", "data_dir": "d", "pretrained": "w.pt"}
    data = {**MINIMAL, "task": task, "storage": "s.db"}
    spec = parse_space(data, source="dict")
    assert (spec.task.data_dir, spec.task.pretrained, spec.storage) == ("d", "w.pt", "sqlite:///s.db")
    based = parse_space(data, source="dict", base=tmp_path)
    assert based.task.data_dir == str(tmp_path / "d")
    assert based.task.pretrained == str(tmp_path / "w.pt")
    assert based.storage == f"sqlite:///{tmp_path / 's.db'}"
    assert based.space_hash == spec.space_hash


@pytest.mark.parametrize(
    ("name", "resolved"),
    [
        ("tasks/mine.py:make", "{folder}/tasks/mine.py:make"),
        ("mine.py", "{folder}/mine.py"),
        ("../mine.py:make_task", "{parent}/mine.py:make_task"),
        ("/abs/mine.py:make", "/abs/mine.py:make"),
        ("package.module:make", "package.module:make"),
        ("digits", "digits"),
    ],
)
def test_a_task_file_is_relative_to_the_space_file(
    tmp_path: Path, name: str, resolved: str
) -> None:
    path = _write(tmp_path / "spaces" / "s.yaml", {**MINIMAL, "task": {"name": name}})
    spec = load_space(path)
    assert spec.task.name == resolved.format(folder=tmp_path / "spaces", parent=tmp_path)
    assert spec.space_hash == parse_space({**MINIMAL, "task": name}, source="x").space_hash


def test_a_task_file_named_from_the_working_folder_before_matches_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    old = parse_space({**MINIMAL, "task": "tasks/t.py:make"}, source="old")
    path = _write(tmp_path / "spaces" / "s.yaml", {**MINIMAL, "task": "../tasks/t.py:make"})
    new = load_space(path)
    assert new.task.name == f"{tmp_path}/tasks/t.py:make"
    assert new.space_hash != old.space_hash
    assert new.matches_stored(old.space_hash, old.to_dict())
    assert new.changed_from(old.to_dict()) == []
    _write(path, {**MINIMAL, "task": "../tasks/u.py:make"})
    other = load_space(path)
    assert not other.matches_stored(old.space_hash, old.to_dict())
    assert other.changed_from(old.to_dict()) == ["task.name"]


def test_a_user_task_file_beside_the_space_is_found_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project, _ = _layout(tmp_path, monkeypatch)
    examples = Path(__file__).resolve().parents[1] / "examples" / "user_task.py"
    (project / "spaces" / "wine.py").write_text(examples.read_text())
    space = {
        "algorithm": "qat",
        "task": "wine.py:make_task",
        "quantize": {"weight": {"op_types": ["Linear"]}},
        "params": {"quant_bits": 8},
    }
    path = _write(project / "spaces" / "s.yaml", space)
    assert main(["validate", "--space", str(path)]) == 0, capsys.readouterr().err


# --- The command line ---------------------------------------------------------------------


def test_a_study_of_a_space_in_another_folder_finds_its_files_and_writes_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project, cwd = _layout(tmp_path, monkeypatch)
    _save_digits_weights(project / "weights" / "m.pt")
    task = {**SMALL_SPACE["task"], "pretrained": "../weights/m.pt"}
    space = {**SMALL_SPACE, "task": task, "n_trials": 2, "storage": "../studies/small.db"}
    _write(project / "spaces" / "space.yaml", space)
    args = ["--quiet", "--no-report", "--threads", "1"]
    assert main(["study", "--space", "../proj/spaces/space.yaml", *args]) == 0
    out = capsys.readouterr().out
    assert "storage sqlite:///../proj/studies/small.db" in out
    assert (project / "studies" / "small.db").is_file()
    assert not (cwd / "studies").exists()
    study = optuna.load_study(
        study_name="small", storage=f"sqlite:///{project / 'studies' / 'small.db'}"
    )
    assert study.user_attrs["float_model"]["source"] == "pretrained ../proj/weights/m.pt"
    # From another folder, by another path: the same study, which resumes.
    monkeypatch.chdir(project)
    assert main(["study", "--space", "spaces/space.yaml", *args]) == 0
    assert "resuming: 2 of 2 trials done" in capsys.readouterr().out
    # --storage is relative to the working folder.
    given = ["--storage", "runs/other.db", "--n-trials", "2"]
    assert main(["study", "--space", "spaces/space.yaml", *given, *args]) == 0
    assert (project / "runs" / "other.db").is_file()
    assert not (project / "spaces" / "runs").exists()


def test_a_missing_pretrained_file_is_named_by_its_resolved_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project, _ = _layout(tmp_path, monkeypatch)
    task = {"name": "digits", "pretrained": "weights/missing.pt"}
    path = _write(project / "spaces" / "s.yaml", {**SMALL_SPACE, "task": task})
    assert main(["validate", "--space", str(path)]) == 2
    missing = project / "spaces" / "weights" / "missing.pt"
    assert f"task.pretrained: {missing}: no such state-dict file" in capsys.readouterr().err


def test_a_data_dir_in_a_space_is_relative_to_it_and_data_dir_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project, cwd = _layout(tmp_path, monkeypatch)
    task = {"name": "mnist", "data_dir": "../data/mnist"}
    space = {**SMALL_SPACE, "task": task, "quantize": {"weight": {"op_types": ["Linear"]}}}
    space = {**space, "per_layer": None, "params": {"quant_bits": 8}}
    path = _write(project / "spaces" / "s.yaml", {k: v for k, v in space.items() if v is not None})
    assert main(["validate", "--space", str(path)]) == 2
    assert f"data directory {project / 'data' / 'mnist'} does not exist" in capsys.readouterr().err
    write_mnist_files(project / "data" / "mnist")
    assert main(["validate", "--space", str(path)]) == 0
    capsys.readouterr()
    assert main(["validate", "--space", str(path), "--data-dir", "here"]) == 2
    assert "data directory here does not exist" in capsys.readouterr().err
    write_mnist_files(cwd / "here")
    assert main(["validate", "--space", str(path), "--data-dir", "here"]) == 0


def test_a_study_created_when_paths_were_relative_to_the_working_folder_still_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _save_digits_weights(tmp_path / "weights" / "m.pt")
    _save_digits_weights(tmp_path / "weights" / "other.pt")
    task = {**SMALL_SPACE["task"], "pretrained": "weights/m.pt"}
    old_space = {**SMALL_SPACE, "task": task, "n_trials": 2, "storage": "studies/small.db"}
    # Before: the space's paths were read from the working folder (a space without a base).
    old = parse_space(old_space, source="spaces/space.yaml", default_name="space")
    study = open_study(prepare(old))
    old_hash = study.user_attrs["space_hash"]
    # Now: the same files, named from the space's folder.
    new_task = {**task, "pretrained": "../weights/m.pt"}
    new_space = {**old_space, "task": new_task, "storage": "../studies/small.db"}
    _write(tmp_path / "spaces" / "space.yaml", new_space)
    new = load_space("spaces/space.yaml")
    assert new.space_hash != old_hash  # the text changed, the files did not
    assert new.matches_stored(old_hash, study.user_attrs["space"])
    args = ["--quiet", "--no-report", "--threads", "1"]
    assert main(["study", "--space", "spaces/space.yaml", *args]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="small", storage="sqlite:///studies/small.db")
    assert len(study.trials) == 2 and study.user_attrs["space_hash"] == old_hash
    # Another file is another space: refused, naming the key.
    other = {**new_space, "task": {**task, "pretrained": "../weights/other.pt"}}
    _write(tmp_path / "spaces" / "space.yaml", other)
    assert main(["study", "--space", "spaces/space.yaml", *args]) == 2
    assert "changed: task.pretrained)" in capsys.readouterr().err
