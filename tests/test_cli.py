"""The quantsearch command: a study end to end, and every user error's message and exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
import yaml
from optuna.trial import TrialState

from quantsearch.cli import main
from quantsearch.search import available_cores
from tests.search._spaces import SMALL_SPACE

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder: relative storages and reports land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _space(folder: Path, name: str = "space.yaml", **changes: object) -> Path:
    space = {**SMALL_SPACE, "storage": "studies/small.db", **changes}
    path = folder / name
    path.write_text(yaml.safe_dump({k: v for k, v in space.items() if v is not None}))
    return path


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_study_then_trials_then_report(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(workdir, n_trials=3)
    code, out, err = _run(["study", "--space", str(space), "--quiet", "--threads", "1"], capsys)
    assert code == 0, err
    assert (
        "study 'small': qat on digits (from the float model), objectives accuracy, size_bytes, "
        f"3 trials, 1 job(s) x 1 thread(s) on {available_cores()} cores, "
        f"storage sqlite:///{workdir}/studies/" in out  # the space's folder, given absolute
    )
    assert "float model: training 5 epochs (once per study) ..." in out
    lines = [line for line in out.splitlines() if "] trial " in line]
    assert len(lines) == 3
    assert "trial   0 COMPLETE val " in lines[0]
    assert "[baseline float]" in lines[0]
    assert "Pareto front (" in out
    assert "report: reports/small/report.md" in out
    assert (workdir / "studies" / "small.db").is_file()
    assert (workdir / "reports" / "small" / "report.md").is_file()

    code, out, err = _run(["trials", "--space", str(space)], capsys)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:8] == [
        "trial",
        "state",
        "val_acc",
        "test_acc",
        "size",
        "ratio",
        "seconds",
        "note",
    ]
    assert len(rows) == 3
    assert "baseline float" in rows[0]
    # Ratios read as in the front table; the float baseline's bits parameters show "-".
    assert "1.00x" in rows[0].split()
    assert rows[0].split()[-4:] == ["-", "-", "-", "-"]

    storage = "sqlite:///studies/small.db"
    code, out, _ = _run(["trials", "--storage", storage, "--study", "small"], capsys)
    assert code == 0
    assert len(out.splitlines()) == 4

    code, out, err = _run(["report", "--space", str(space), "--out", "rep"], capsys)
    assert code == 0, err
    assert out.strip() == "report: rep/report.md"
    code, out, err = _run(["export", "--space", str(space), "--trial", "1", "--out", "m"], capsys)
    assert code == 0, err
    assert out.startswith("exported trial 1 to m\n  model.pt ")
    assert "test accuracy of the reloaded packed model:" in out and out.rstrip().endswith("equal")
    assert (workdir / "m" / "model.qpk").is_file()
    code, out, err = _run(["export", "--space", str(space), "--trial", "0", "--out", "f"], capsys)
    assert code == 0, err  # the float baseline exports too
    assert (workdir / "f" / "model.qpk").is_file()

    # Running the finished study again trains nothing and prints its front.
    code, out, _ = _run(["study", "--space", str(space), "--quiet", "--no-report"], capsys)
    assert code == 0
    assert "resuming: 3 of 3 trials done" in out
    assert "] trial " not in out


def test_progress_bar_goes_to_stderr(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(workdir, n_trials=2)
    code, out, err = _run(["study", "--space", str(space), "--no-report"], capsys)
    assert code == 0
    assert "2/2" in err
    assert "front" in err
    assert out.count(" COMPLETE ") == 2


def test_version_prints_the_package_version(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.metadata

    import quantsearch

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out, err = capsys.readouterr()
    assert out == f"quantsearch {quantsearch.__version__}\n" and err == ""
    # The version the package was installed as, and the command as a shell runs it.
    assert quantsearch.__version__ == importlib.metadata.version("quantsearch")
    shell = subprocess.run(
        [sys.executable, "-m", "quantsearch", "--version"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert (shell.returncode, shell.stdout) == (0, f"quantsearch {quantsearch.__version__}\n")
    assert _files(workdir) == set()


def test_validate_prints_the_space(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(workdir)
    code, out, _ = _run(["validate", "--space", str(space)], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{space}: valid"
    assert "layers     conv1, conv2, fc1, fc2" in out
    assert "per layer  weight_bits: choice [2, 4, 8, 'float'] on conv1, conv2, fc1, fc2" in out
    assert "searched   6 parameter(s)" in out
    assert _files(workdir) == {"space.yaml"}


def test_shipped_default_space_validates(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["validate", "--space", str(REPO / "search_spaces" / "qat.yaml")], capsys)
    assert code == 0
    assert "algorithm  qat" in out


USER_ERRORS = [
    # (file content or None for a missing file, extra args, expected message)
    (None, [], "missing.yaml: no such file"),
    ("algorithm: qat\nparams: {quant_bits: [\n", [], "space.yaml: not valid YAML: line 3"),
    (
        {"epoch": 3},
        [],
        "space.yaml: epoch: unknown key 'epoch'; allowed: study_name, task, algorithm",
    ),
    ({"train": {"epochs": -1}}, [], "space.yaml: train.epochs: -1 is not an integer >= 1"),
    (
        {"params": {"quant_bits": {"_type": "choice", "_value": [4, 64]}}},
        [],
        "space.yaml: params.quant_bits._value[1]: 64 is not an integer 1..16 or 'float'",
    ),
    (
        {"params": {"output_bits": {"_type": "choice", "_value": [8, 1]}}},
        [],
        "space.yaml: params.output_bits: 1 gives a config_list the qat quantizer refuses: ",
    ),
    ({"task": "digitz"}, [], "unknown task 'digitz' (did you mean 'digits'?)"),
    ({"task": {"name": "mnist", "data_dir": "nodata"}}, [], "nodata"),
    (
        {"quantize": {"weight": {"op_names": ["conv9"]}}},
        [],
        "space.yaml: quantize.weight.op_names: 'conv9' is not a module of the model",
    ),
    ({}, ["--storage", "://x"], "--storage: '://x' is not a database URL"),
    ({}, ["--n-trials", "1"], "--n-trials: 1 is fewer than the 2 baseline trials"),
]


@pytest.mark.parametrize(
    ("command", "content", "args", "message"),
    [
        (command, *case)
        for command in ("study", "validate")
        for case in USER_ERRORS
        if command == "study" or not case[1]  # validate takes no overrides
    ],
)
def test_user_errors_exit_2_with_a_short_message_and_write_nothing(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    content: object,
    args: list[str],
    message: str,
) -> None:
    if content is None:
        space = workdir / "missing.yaml"
    elif isinstance(content, str):
        space = workdir / "space.yaml"
        space.write_text(content)
    else:
        space = _space(workdir, **content)
    before = _files(workdir)
    code, _, err = _run([command, "--space", str(space), *args], capsys)
    assert code == 2
    assert err.startswith("quantsearch: error: ")
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert _files(workdir) == before


def test_missing_data_files_name_what_was_expected(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(workdir, task={"name": "mnist", "data_dir": "nodata"})
    code, _, err = _run(["study", "--space", str(space)], capsys)
    assert code == 2
    assert "train-images-idx3-ubyte" in err


def test_a_changed_space_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(workdir, n_trials=2)
    assert _run(["study", "--space", str(space), "--quiet", "--no-report"], capsys)[0] == 0
    changed = _space(workdir, name="changed.yaml", n_trials=2, sampler={"name": "tpe"})
    before = _files(workdir)
    code, _, err = _run(["study", "--space", str(changed), "--quiet"], capsys)
    assert code == 2
    assert "was created from a different space (changed: sampler.name)" in err
    assert _files(workdir) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trials", "--space", "space.yaml"], "no study database at studies/small.db; run"),
        (["trials"], "name the study with --space FILE, or with --storage URL --study NAME"),
        (["trials", "--storage", "x.db"], "name the study with --space FILE"),
        (
            ["trials", "--space", "space.yaml", "--study", "a"],
            "give --space, or --storage with --study, not both",
        ),
        (["report", "--space", "space.yaml"], "no study database at studies/small.db"),
        (["export", "--space", "space.yaml", "--trial", "0", "--out", "m"], "no study database"),
    ],
)
def test_reading_commands_without_a_study(
    workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    _space(workdir)
    code, _, err = _run(args, capsys)
    assert code == 2
    assert message in err
    assert _files(workdir) == {"space.yaml"}


def test_unknown_study_name_lists_those_present(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(workdir, n_trials=2)
    assert _run(["study", "--space", str(space), "--quiet", "--no-report"], capsys)[0] == 0
    code, _, err = _run(["trials", "--storage", "studies/small.db", "--study", "big"], capsys)
    assert code == 2
    assert "holds no study 'big' (it holds: small)" in err


@pytest.mark.parametrize(
    "args",
    [
        ["study"],
        ["study", "--space", "s.yaml", "--jobs", "0"],
        ["study", "--space", "s.yaml", "--n-trials", "x"],
        ["frobnicate"],
    ],
)
def test_argument_errors_exit_2(
    workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    assert "quantsearch" in capsys.readouterr().err


# --- Real processes --------------------------------------------------------------------------


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantsearch", *args]


# One torch thread per process: the trials are tiny and the cores may be shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_process(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`quantsearch ARGS` as a real process in ``folder``."""
    return subprocess.run(
        _command(*args), cwd=folder, env=ENV, capture_output=True, text=True, timeout=300
    )


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    path = Path(storage.removeprefix("sqlite:///"))
    if not path.is_file():
        return []  # not created yet (loading would create it)
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            ready = db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
        except sqlite3.Error:
            ready = False
    if not ready:
        return []  # the study process is still creating its tables: never race it
    try:
        return optuna.load_study(study_name="small", storage=storage).get_trials()
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):
        return []  # the study process is still creating the database: poll again


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    """Kill a real study process mid-trial; the rerun re-queues that trial and finishes."""
    n_trials = 8
    space = _space(
        tmp_path, n_trials=n_trials, train={"epochs": 2}, float_train={"epochs": 1}, task="digits"
    )
    storage = f"sqlite:///{tmp_path / 'studies' / 'small.db'}"
    killed_running: list[int] = []
    for _ in range(3):
        process = subprocess.Popen(
            _command("study", "--space", str(space), "--quiet", "--no-report"),
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            trials = _trials(storage)
            sampled = [set(t.params) for t in trials if t.state == TrialState.COMPLETE]
            # Training starts once every parameter is sampled: kill only then.
            if sampled and any(
                t.state == TrialState.RUNNING and set(t.params) >= sampled[0] for t in trials
            ):
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        killed_running = [t.number for t in _trials(storage) if t.state == TrialState.RUNNING]
        if killed_running:
            break
    assert killed_running, "the process was never caught mid-trial"
    before = _trials(storage)
    assert sum(t.state == TrialState.COMPLETE for t in before) < n_trials

    result = _run_process(tmp_path, "study", "--space", str(space), "--quiet", "--no-report")
    assert result.returncode == 0, result.stderr
    after = _trials(storage)
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials
    # Nothing lost: every trial complete before the kill is still there, unchanged.
    for trial in before:
        if trial.state == TrialState.COMPLETE:
            assert after[trial.number].values == trial.values
    for number in killed_running:
        assert after[number].state == TrialState.FAIL
        assert after[number].user_attrs["fail_reason"].startswith("interrupted")
        retry = [t for t in after if t.user_attrs.get("retry_of") == number]
        assert len(retry) == 1
        # A trial killed while sampling is retried with what it had sampled, the rest drawn anew.
        assert retry[0].params.items() >= after[number].params.items()
        assert len(retry[0].params) == len(complete[0].params)
        assert retry[0].state == TrialState.COMPLETE
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
def test_two_jobs_from_the_command_line(tmp_path: Path) -> None:
    space = _space(tmp_path, n_trials=6)
    result = _run_process(tmp_path, "study", "--space", str(space), "--jobs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower()
    assert "locked" not in result.stderr.lower()
    assert result.stdout.count(" COMPLETE ") == 6
    trials = _trials(f"sqlite:///{tmp_path / 'studies' / 'small.db'}")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6


def test_an_unreachable_database_is_a_user_error(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(workdir)
    url = "postgresql://nobody@127.0.0.1:1/none"
    code, _, err = _run(["study", "--space", str(space), "--storage", url], capsys)
    assert code == 2
    assert err.startswith(f"quantsearch: error: {url}: ")
    # Without the driver: how to get it; with it: why the server did not answer.
    assert "pip install 'quantsearch[postgres]'" in err or "cannot open the database" in err
    assert _files(workdir) == {"space.yaml"}


def test_unusable_outputs_and_storages_are_user_errors(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(workdir, n_trials=3)
    (workdir / "taken").write_text("a file")
    code, _, err = _run(["study", "--space", str(space), "--report-dir", "taken"], capsys)
    assert code == 2
    assert err.strip() == "quantsearch: error: --report-dir taken: is a file, not a folder"
    assert not (workdir / "studies").exists()
    code, _, err = _run(["trials", "--storage", "foo://x", "--study", "a"], capsys)
    assert code == 2
    assert err.startswith("quantsearch: error: foo://x: not a database URL sqlalchemy knows")
    if not torch.cuda.is_available():
        train = {**SMALL_SPACE.get("train", {}), "device": "cuda"}
        code, _, err = _run(["validate", "--space", str(_space(workdir, train=train))], capsys)
        assert code == 2
        assert "train.device: device 'cuda' asked for, but CUDA is not available" in err
