"""The command line against hostile input: each refusal is one line, exit code 2, and changes no
byte of an existing database and no file outside the folders the user gave."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from quantsearch.cli import main
from tests.search._spaces import SMALL_SPACE

RULE = (
    "is not a study name: use 1 to 100 ASCII letters, digits, '.', '_' or '-', starting with a "
    "letter or a digit (it names the study's files and folders)"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}



@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path/a/b/work as the current folder: a name that climbs out lands in tmp_path."""
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


def _space(folder: Path, name: str = "space.yaml", **changes: object) -> Path:
    space = {**SMALL_SPACE, "storage": "studies/small.db", **changes}
    path = folder / name
    path.write_text(yaml.safe_dump({k: v for k, v in space.items() if v is not None}))
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256 (SQLite's transient -wal/-shm left out)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as stop:  # argparse
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line message of a refused command (exit code 2, no traceback)."""
    code, _, err = _run(args, capsys)
    assert code == 2, err
    assert err.startswith("quantsearch")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# --- Study names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../x", "..", "/tmp/qs-abs", "a/b", "x" * 300, "a\0b"])
@pytest.mark.parametrize("command", ["study", "validate"])
def test_a_study_name_that_climbs_out_writes_nothing_anywhere(
    workdir: Path, capsys: pytest.CaptureFixture[str], name: str, command: str
) -> None:
    space = workdir / "space.yaml"
    space.write_text(yaml.safe_dump({**SMALL_SPACE, "study_name": name}))
    root = workdir.parents[2]
    before = _tree(root)
    message = _refused([command, "--space", "space.yaml"], capsys)
    assert message.startswith("quantsearch: error: space.yaml: study_name: ")
    assert message.endswith(RULE)
    assert _tree(root) == before
    assert not Path("/tmp/qs-abs").exists()


def test_a_stored_study_name_that_is_no_folder_needs_out(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A study another tool created under a path-like name: its report needs --out."""
    import optuna

    optuna.create_study(study_name="../up", storage="sqlite:///other.db")
    before = _tree(workdir.parents[2])
    message = _refused(["report", "--storage", "other.db", "--study", "../up"], capsys)
    assert message == f"quantsearch: error: --study: '../up' {RULE}; give the folder with --out"
    assert _tree(workdir.parents[2]) == before


# --- Storages ---------------------------------------------------------------------------------


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE people (name TEXT)")
        db.execute("INSERT INTO people VALUES ('ann')")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding space.yaml and the finished 2-trial study it names (a real process)."""
    folder = tmp_path_factory.mktemp("finished")
    _space(folder, n_trials=2, baselines={"float": True, "uniform_bits": []})
    result = subprocess.run(
        [sys.executable, "-m", "quantsearch", "study", "--space", "space.yaml", "--quiet"],
        cwd=folder, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture
def study_copy(finished_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    shutil.copytree(finished_study, work)
    monkeypatch.chdir(work)
    return work


def test_sqlite_files_that_are_not_a_study_are_refused_unchanged(
    workdir: Path, capsys: pytest.CaptureFixture[str], finished_study: Path
) -> None:
    _space(workdir, n_trials=2)
    Path("text.db").write_text("hello, not a database\n")
    Path("folder.db").mkdir()
    _foreign(workdir / "foreign.db")
    shutil.copy(finished_study / "studies" / "small.db", "old.db")
    with sqlite3.connect("old.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    data = (finished_study / "studies" / "small.db").read_bytes()
    Path("truncated.db").write_bytes(data[:3000])
    damaged = bytearray(data)
    for page in (1, 2, 3):  # the b-tree headers of three pages
        damaged[4096 * page : 4096 * page + 12] = b"\xff" * 12
    Path("damaged.db").write_bytes(bytes(damaged))
    cases = {
        "text.db": "text.db: is not a SQLite database (it lacks SQLite's file header)",
        "folder.db": "folder.db: is a folder, not a SQLite database file",
        "foreign.db": "foreign.db: is a SQLite database that quantsearch did not create "
        "(its tables: people); give another --storage",
        "old.db": "old.db: its study tables are of another optuna version (schema v3.0.0.d, "
        "this optuna",
        "truncated.db": "truncated.db: is a corrupt SQLite database (",
        "damaged.db": "damaged.db: is a corrupt SQLite database (",
    }
    for storage, expected in cases.items():
        for args in (
            ["study", "--space", "space.yaml", "--storage", storage, "--quiet"],
            ["trials", "--storage", storage, "--study", "small"],
        ):
            before = _tree(workdir)
            message = _refused(args, capsys)
            assert message.startswith(f"quantsearch: error: {expected}"), message
            assert _tree(workdir) == before, args


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Makes a file or folder read-only for this process, root included (immutable)."""
    made: list[Path] = []

    def make(path: Path) -> None:
        path.chmod(0o555 if path.is_dir() else 0o444)
        if os.geteuid() == 0:  # root ignores modes, not the immutable attribute
            if shutil.which("chattr") is None:
                pytest.skip("root, and no chattr to make a file read-only")
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"chattr +i refused here: {done.stderr.decode().strip()}")
        made.append(path)

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_read_only_database_is_refused(
    study_copy: Path, capsys: pytest.CaptureFixture[str], read_only: Callable[[Path], None]
) -> None:
    read_only(Path("studies/small.db"))
    before = _tree(study_copy)
    message = _refused(["study", "--space", "space.yaml", "--n-trials", "3"], capsys)
    assert message == (
        "quantsearch: error: studies/small.db: is read-only, and the study writes its trials "
        "to it"
    )
    assert _tree(study_copy) == before


def test_a_read_only_artifacts_folder_is_refused_before_the_first_trial(
    study_copy: Path, capsys: pytest.CaptureFixture[str], read_only: Callable[[Path], None]
) -> None:
    read_only(Path("studies/small_artifacts/small"))
    before = _tree(study_copy)
    message = _refused(["study", "--space", "space.yaml", "--n-trials", "3"], capsys)
    assert message == (
        "quantsearch: error: the artifacts folder studies/small_artifacts/small: is not writable"
    )
    assert _tree(study_copy) == before


def test_an_existing_study_is_byte_identical_after_every_refused_input(
    study_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("a file").write_text("x")
    Path("bomb.yaml").write_text(
        "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
    )
    _space(study_copy, "changed.yaml", n_trials=2, baselines={"float": True, "uniform_bits": []},
           sampler={"name": "tpe"})
    _space(study_copy, "escape.yaml", study_name="../../x")
    _space(study_copy, "inf.yaml", params={"output_bits": 8,
                                           "quant_start_step": {"_type": "uniform",
                                                                "_value": [0, float("inf")]}})
    _space(study_copy, "task.yaml", task="no_such_task")
    Path("broken.yaml").write_text("algorithm: qat\nstorage: studies/small.db\nparams: {\n")
    cases = [
        (["study", "--space", "changed.yaml"], "was created from a different space"),
        (["study", "--space", "bomb.yaml"], "bomb.yaml: too large"),
        (["study", "--space", "broken.yaml"], "broken.yaml: not valid YAML"),
        (["study", "--space", "escape.yaml"], RULE),
        (["study", "--space", "inf.yaml"], "every bound must be a finite number"),
        (["study", "--space", "task.yaml"], "unknown task 'no_such_task'"),
        (["study", "--space", "space.yaml", "--jobs", "0"], "0 is not an integer >= 1"),
        (["study", "--space", "space.yaml", "--n-trials", "x"], "'x' is not an integer"),
        (["study", "--space", "space.yaml", "--report-dir", "a file"], "is a file"),
        (["study", "--space", "space.yaml", "--storage", "a file"], "is not a SQLite database"),
        (["trials", "--storage", "studies/small.db", "--study", "nope"], "holds no study 'nope'"),
        (["export", "--space", "space.yaml", "--trial", "9", "--out", "e"], "has no trial 9"),
        (["export", "--space", "space.yaml", "--trial", "1", "--out", "a file"], "is a file"),
        (["report", "--space", "space.yaml", "--out", "a file"], "is a file"),
    ]
    for args, expected in cases:
        before = _tree(study_copy)
        message = _refused(args, capsys)
        assert expected in message, (args, message)
        assert _tree(study_copy) == before, args


# --- Passwords --------------------------------------------------------------------------------


def test_a_password_in_the_storage_url_is_never_printed(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(workdir)
    url = "postgresql://ann:s3cret@127.0.0.1:1/none"
    code, out, err = _run(["study", "--space", str(space), "--storage", url, "--quiet"], capsys)
    assert code == 2
    assert "s3cret" not in out + err
    assert "storage postgresql://ann:***@127.0.0.1:1/none" in out
    assert err.startswith("quantsearch: error: postgresql://ann:***@127.0.0.1:1/none: ")
    code, out, err = _run(["trials", "--storage", url, "--study", "x"], capsys)
    assert code == 2
    assert "s3cret" not in out + err
    code, out, err = _run(["validate", "--space", str(_space(workdir, storage=url))], capsys)
    assert code == 0, err
    assert "storage postgresql://ann:***@127.0.0.1:1/none" in out
    assert "s3cret" not in out + err


def test_the_report_command_line_masks_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantsearch import cli

    monkeypatch.setattr(
        sys, "argv", ["quantsearch", "report", "--storage", "postgresql://u:pw@h/d", "--study", "s"]
    )
    assert cli._command_line() == "quantsearch report --storage postgresql://u:***@h/d --study s"


# --- Outputs checked before the first trial ---------------------------------------------------


def test_a_report_folder_that_cannot_be_made_is_refused_before_the_study(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(workdir)
    Path("reports").write_text("a file where the folder goes")
    message = _refused(["study", "--space", str(space)], capsys)
    assert message == (
        "quantsearch: error: --report-dir reports/small: cannot be created: reports is a file, "
        "not a folder"
    )
    assert not Path("studies").exists()


def test_an_artifacts_folder_that_cannot_be_made_is_refused_before_the_first_trial(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(workdir)
    Path("studies").mkdir()
    Path("studies/small_artifacts").write_text("a file where the folder goes")
    message = _refused(["study", "--space", str(space), "--no-report"], capsys)
    studies = workdir / "studies"  # the space's storage, from its (absolute) folder
    assert message == (
        f"quantsearch: error: the artifacts folder {studies}/small_artifacts/small: cannot be "
        f"created: {studies}/small_artifacts is a file, not a folder"
    )
    assert sorted(os.listdir("studies")) == ["small_artifacts"]


def test_a_read_only_report_folder_is_refused_before_the_study(
    workdir: Path, capsys: pytest.CaptureFixture[str], read_only: Callable[[Path], None]
) -> None:
    space = _space(workdir)
    Path("reports").mkdir()
    read_only(Path("reports"))
    message = _refused(["study", "--space", str(space)], capsys)
    assert message == (
        "quantsearch: error: --report-dir reports/small: cannot be created: reports is not "
        "writable"
    )
    assert not Path("studies").exists()


# --- The command line itself ------------------------------------------------------------------


def test_an_argument_error_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _refused(["study", "--space", "s.yaml", "--jobs", "0"], capsys) == (
        "quantsearch: error: argument --jobs: 0 is not an integer >= 1 "
        "(see quantsearch study --help)"
    )


def test_a_task_that_calls_sys_exit_does_not_end_the_study_silently(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("exiting.py").write_text(textwrap.dedent("""
        import sys

        import torch
        from torch import nn
        from torch.utils.data import Dataset, TensorDataset

        from quantsearch.tasks import Task


        class Exits(Dataset):
            def __len__(self):
                return 8

            def __getitem__(self, index):
                sys.exit(0)


        def make_task(*, data_dir, options, seed):
            data = TensorDataset(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))
            return Task(
                name="exits", build_model=lambda: nn.Sequential(nn.Linear(4, 2)),
                train_set=Exits(), val_set=data, test_set=data,
                dummy_input=torch.zeros(1, 4), num_classes=2,
            )
    """))
    space = _space(
        workdir, task="exiting.py:make_task", quantize=None, per_layer=None,
        params={"quant_bits": 8}, baselines={"float": False},
    )
    message = _refused(["study", "--space", str(space), "--quiet", "--no-report"], capsys)
    assert message == (
        "quantsearch: error: the task's code called sys.exit(0); the study stopped there "
        "(its unfinished trials were queued again)"
    )


# --- Checkpoints ------------------------------------------------------------------------------


class _Payload:
    """Runs code when unpickled: what a tampered checkpoint might hold."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled",))


def test_a_damaged_checkpoint_is_one_line_naming_the_file(
    study_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = Path("studies/small_artifacts/small/trial_1.pt")
    data = checkpoint.read_bytes()
    export = ["export", "--space", "space.yaml", "--trial", "1", "--out", "e"]
    damaged = (
        f"quantsearch: error: checkpoint of trial 1 at {checkpoint} is damaged or is not a "
        "checkpoint (truncated or changed since the trial wrote it): run the trial again"
    )
    for content in (data[: len(data) // 2], b"", b"not a checkpoint"):
        checkpoint.write_bytes(content)
        assert _refused(export, capsys) == damaged
    torch.save({"weight": _Payload()}, checkpoint)
    assert _refused(export, capsys) == damaged  # never unpickled
    torch.save({"fc9.weight": torch.zeros(3)}, checkpoint)
    assert _refused(export, capsys) == (
        f"quantsearch: error: checkpoint of trial 1 at {checkpoint} does not fit the trial's "
        "model (its tensors' names or shapes differ): it was changed or belongs to another study"
    )
    assert not Path("e").exists()


# --- Real processes ---------------------------------------------------------------------------


def _popen(folder: Path, *args: str, **options: object) -> subprocess.Popen[str]:
    pipes: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-m", "quantsearch", *args], cwd=folder, env=ENV, text=True,
        **{**pipes, **options},
    )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _running_trials(storage: Path) -> list[int]:
    if not storage.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{storage}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT number FROM trials WHERE state = 'RUNNING' AND trial_id IN "
                "(SELECT trial_id FROM trial_params)"
            ).fetchall()
    except sqlite3.Error:
        return []  # the tables are being created
    return [r[0] for r in rows]


def _wait(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    for _ in range(1200):  # polls, not a measured time: the study only has to get there
        if condition():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError("the study never got there")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_study_and_their_checkpoints_are_not_taken(
    tmp_path: Path,
) -> None:
    _space(tmp_path, n_trials=12, train={"epochs": 30, "batch_size": 64, "lr": 0.003})
    storage = tmp_path / "studies" / "small.db"
    # No pipes: a worker that outlived the study would hold them open.
    process = _popen(tmp_path, "study", "--space", "space.yaml", "--jobs", "2", "--quiet",
                     "--no-report", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: len(_running_trials(storage)) == 2, process)
    children = _children(process.pid)
    assert len(children) >= 2  # two workers (and the resource tracker)
    running = _running_trials(storage)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for _ in range(300):
        if not any(_alive(pid) for pid in children):
            break
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)]

    # A worker killed mid-trial may have left a checkpoint: the resumed study deletes it.
    folder = tmp_path / "studies" / "small_artifacts" / "small"
    for number in running:
        (folder / f"trial_{number}.pt").write_bytes(b"left by a dead worker")
    resumed = subprocess.run(
        [sys.executable, "-m", "quantsearch", "study", "--space", "space.yaml", "--n-trials",
         "4", "--quiet", "--no-report"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    for number in running:
        assert not (folder / f"trial_{number}.pt").exists()


@pytest.mark.slow
def test_two_processes_creating_one_new_study_at_once(tmp_path: Path) -> None:
    _space(tmp_path, n_trials=3)
    processes = [
        _popen(tmp_path, "study", "--space", "space.yaml", "--quiet", "--no-report")
        for _ in range(2)
    ]
    results = [(p, *p.communicate(timeout=600)) for p in processes]
    for process, _, err in results:
        assert "Traceback" not in err
        assert process.returncode in (0, 2), err
        if process.returncode == 2:
            assert err.startswith("quantsearch: error: the study is already running in process ")
    assert any(p.returncode == 0 for p, _, _ in results)
    import optuna

    trials = optuna.load_study(study_name="small", storage="sqlite:///studies/small.db"
                               .replace("studies", str(tmp_path / "studies"))).get_trials()
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["float", "uniform-8"]
    assert len(trials) == 3


@pytest.mark.slow
def test_sigint_stops_a_study_started_with_sigint_ignored(tmp_path: Path) -> None:
    _space(tmp_path, n_trials=6, train={"epochs": 30, "batch_size": 64, "lr": 0.003})
    storage = tmp_path / "studies" / "small.db"
    # What a shell does for a background job (`quantsearch study ... &`).
    process = _popen(tmp_path, "study", "--space", "space.yaml", "--quiet", "--no-report",
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _wait(lambda: bool(_running_trials(storage)), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert err.strip().endswith(
        "quantsearch: interrupted; unfinished trials were queued again: run the same command "
        "to resume"
    )


def test_report_files_are_replaced_whole_and_the_export_line_is_quoted(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quantsearch._paths import replacing

    folder = workdir / "my spaces"
    folder.mkdir()
    space = _space(folder, n_trials=2, baselines={"float": True, "uniform_bits": []})
    code, _, err = _run(["study", "--space", str(space.relative_to(workdir)), "--quiet",
                         "--report-dir", "my report"], capsys)
    assert code == 0, err
    report = (workdir / "my report" / "report.md").read_text()
    assert "quantsearch export --space 'my spaces/space.yaml' --trial " in report
    # A write that dies half-way leaves the previous file whole, and no temporary file.
    target = workdir / "my report" / "pareto.png"
    before = target.read_bytes()
    with pytest.raises(RuntimeError), replacing(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []
