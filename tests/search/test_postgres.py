"""A real PostgreSQL server: two `quantsearch study` processes, as on two machines, share a study.

The server is a throwaway cluster (initdb + pg_ctl) in a temporary folder; the test is skipped
where the PostgreSQL server binaries or psycopg are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from quantsearch.search import _loop, _recovery, load_space, open_study, prepare, run_study
from tests.search._spaces import write_space


def _server_bin() -> Path | None:
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PASSWORD = "s3cret-Pw"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _server(password=None)


@pytest.fixture
def password_url() -> Iterator[str]:
    """A server that asks for PASSWORD: the URL it yields holds none."""
    yield from _server(password=PASSWORD)


def _server(password: str | None) -> Iterator[str]:
    pytest.importorskip("psycopg")
    server_bin = _server_bin()
    if server_bin is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    # The server refuses to run as root: run it as the postgres user, in a folder it owns.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="quantsearch-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", _free_port()
    quiet = {"check": True, "capture_output": True, "timeout": 120}
    auth = ["--auth=trust"]
    if password is not None:
        pwfile = folder / "pwfile"
        pwfile.write_text(password + "\n")
        if as_user:
            shutil.chown(pwfile, "postgres")
        auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run(
        [*as_user, str(server_bin / "initdb"), "-D", str(data), "-U", "quantsearch", *auth,
         "-E", "UTF8"],
        **quiet,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    pg_ctl = [*as_user, str(server_bin / "pg_ctl"), "-D", str(data)]
    subprocess.run([*pg_ctl, "-o", options, "-l", str(folder / "log"), "-w", "start"], **quiet)
    try:
        yield f"postgresql://quantsearch@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_machines_share_one_study(tmp_path: Path, postgres_url: str) -> None:
    n_trials = 8
    space = write_space(
        tmp_path,
        n_trials=n_trials,
        storage=postgres_url,
        train={"epochs": 3},
        float_train={"epochs": 1},
    )
    machines = [tmp_path / "machine_a", tmp_path / "machine_b"]
    processes = []
    for folder in machines:
        folder.mkdir()
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "quantsearch", "study", "--space", str(space), "--quiet",
                 "--no-report"],
                cwd=folder,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err

    trials = optuna.load_study(study_name="small", storage=postgres_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # Two machines asking at the same instant may each start the last trial.
    assert n_trials <= len(complete) <= n_trials + 1
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # The study was created once: one set of baselines.
    assert sorted(t.user_attrs["baseline"] for t in trials if "baseline" in t.user_attrs) == [
        "float",
        "uniform-8",
    ]
    # Every trial was run by exactly one machine, and its checkpoint is on that machine.
    owners = {
        t.number: [i for i, (out, _) in enumerate(outputs) if f"trial {t.number:>3} " in out]
        for t in trials
    }
    assert all(len(owner) == 1 for owner in owners.values()), owners
    for trial in trials:
        if "checkpoint" in trial.user_attrs and "duplicate_of" not in trial.user_attrs:
            checkpoint = Path(trial.user_attrs["checkpoint"])
            assert checkpoint.is_file()
            assert checkpoint.is_relative_to(machines[owners[trial.number][0]])
    # Each machine made the float model once, and both made the one the study recorded.
    from quantsearch.pipeline import FloatModel, load_state, state_sha256

    study = optuna.load_study(study_name="small", storage=postgres_url)
    recorded = FloatModel.model_validate(study.user_attrs["float_model"])
    for folder in machines:
        weights = folder / "studies" / "small_artifacts" / "float_model.pt"
        assert state_sha256(load_state(weights)) == recorded.sha256


@pytest.mark.slow
def test_a_role_that_cannot_create_tables_is_a_user_error(
    tmp_path: Path, postgres_url: str
) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE ROLE reader LOGIN")
    url = postgres_url.replace("quantsearch@", "reader@")
    space = write_space(tmp_path, storage=url)
    result = subprocess.run(
        [sys.executable, "-m", "quantsearch", "study", "--space", str(space)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"quantsearch: error: {url}: cannot set up the study tables: "
        "permission denied for schema public\n"
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_dead_machines_trial_is_failed_by_heartbeat_and_run_again(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_recovery, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(_recovery, "GRACE_SECONDS", 1)
    context = prepare(load_space(write_space(tmp_path, n_trials=3, storage=postgres_url)))
    study = open_study(context)
    # Another machine asked a trial, sent one heartbeat, and died.
    abandoned = study.ask(context.plan.distributions)
    study._storage.record_heartbeat(abandoned._trial_id)
    time.sleep(2.5)

    trials = run_study(context).get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == (
        "interrupted: no heartbeat for 1 s (its machine or process died) mid-trial"
    )
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert retry.params == trials[0].params and retry.state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3


def _quantsearch(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantsearch", *args],
        cwd=folder, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


@pytest.mark.slow
def test_the_password_comes_from_the_environment_and_is_never_printed_or_stored(
    tmp_path: Path, password_url: str
) -> None:
    import psycopg

    with_password = password_url.replace("quantsearch@", f"quantsearch:{PASSWORD}@")
    space = write_space(tmp_path, n_trials=2, baselines={"float": True, "uniform_bits": []})
    run = _quantsearch(tmp_path, "study", "--space", str(space), "--storage", with_password)
    assert run.returncode == 0, run.stderr
    masked = password_url.replace("quantsearch@", "quantsearch:***@")
    assert f"storage {masked}" in run.stdout
    report = tmp_path / "reports" / "small"
    written = [run.stdout, run.stderr, *(p.read_text() for p in report.glob("*.md")),
               (report / "trials.csv").read_text()]
    assert not [text for text in written if PASSWORD in text]
    assert f"--storage {masked}" in (report / "report.md").read_text()
    with psycopg.connect(with_password) as connection:
        stored = [row[0] for table in ("study_user_attributes", "trial_user_attributes")
                  for row in connection.execute(f"SELECT value_json FROM {table}")]
    assert stored and not [value for value in stored if PASSWORD in value]
    study = optuna.load_study(study_name="small", storage=with_password)
    assert study.user_attrs["space"]["storage"] == masked

    # No password in the URL: PGPASSWORD, or a password file, as for any PostgreSQL client.
    reading = ("trials", "--storage", password_url, "--study", "small")
    refused = _quantsearch(tmp_path, *reading, PGPASSFILE=str(tmp_path / "none"))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"quantsearch: error: {password_url}: cannot open the ")
    assert len(refused.stderr.splitlines()) == 1
    by_env = _quantsearch(tmp_path, *reading, PGPASSWORD=PASSWORD)
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout.count(" COMPLETE ") == 2
    pgpass = tmp_path / "pgpass"
    port = password_url.rsplit(":", 1)[1].split("/")[0]
    pgpass.write_text(f"127.0.0.1:{port}:*:quantsearch:{PASSWORD}\n")
    pgpass.chmod(0o600)
    by_file = _quantsearch(tmp_path, *reading, PGPASSFILE=str(pgpass))
    assert by_file.returncode == 0, by_file.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_running_on_another_machine_is_not_trained_twice(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_loop, "_ELSEWHERE_POLL_SECONDS", 0.1)
    space = write_space(tmp_path, n_trials=2, storage=postgres_url,
                        baselines={"float": False, "uniform_bits": [8]})
    context = prepare(load_space(space))
    study = open_study(context)
    # The other machine holds the baseline (trial 0); the same parameters are queued again.
    elsewhere = study.ask(context.plan.distributions)
    study._storage.record_heartbeat(elsewhere._trial_id)
    study.enqueue_trial(elsewhere.params, user_attrs={"baseline": "uniform-8"})
    plan = context.plan
    values = plan.values(elsewhere.params)
    attrs = {"config_list": plan.config_list(values), "train": plan.train_overrides(values),
             "val_accuracy": 0.5, "test_accuracy": 0.5, "size_bytes": 1000,
             "algorithm": "qat", "train_seconds": 1.0}

    def finish_elsewhere() -> None:
        # Once this process has parked trial 1, the other machine finishes trial 0.
        other = optuna.load_study(study_name="small", storage=postgres_url)
        while len(other.get_trials()) < 2 or other.get_trials()[1].state != TrialState.RUNNING:
            time.sleep(0.05)
        time.sleep(0.3)
        for key, value in attrs.items():
            other._storage.set_trial_user_attr(elsewhere._trial_id, key, value)
        other.tell(0, [0.5, 1000.0])

    import threading

    thread = threading.Thread(target=finish_elsewhere)
    thread.start()
    trials = run_study(context).get_trials()
    thread.join()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["duplicate_of"] == 0
    assert trials[1].user_attrs["train_seconds"] == 0.0
    assert trials[1].values == [0.5, 1000.0]


def _machine(folder: Path, space: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    folder.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "quantsearch", "study", "--space", str(space), "--quiet",
         "--no-report", *args],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def _trained(output: str) -> set[int]:
    """The trial numbers a `quantsearch study --quiet` output says it ran (not reused)."""
    import re

    found = (re.search(r"trial\s+(\d+) COMPLETE", line) for line in output.splitlines()
             if "not trained again" not in line)
    return {int(match.group(1)) for match in found if match}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_killed_machines_trials_are_finished_elsewhere_and_export_from_a_third(
    tmp_path: Path, postgres_url: str
) -> None:
    """Two working folders (two machines) share a study on PostgreSQL and one artifact folder;
    one is killed mid-trial; the other finishes; a third folder exports a trial the killed one
    trained, from the artifact store, and its accuracy reproduces."""
    import shutil
    import signal
    import threading

    shared = tmp_path / "nfs"
    space = write_space(
        tmp_path, n_trials=10, storage=postgres_url, artifacts=str(shared),
        train={"epochs": 4}, float_train={"epochs": 1},
    )  # fmt: skip
    quick = {"QUANTSEARCH_HEARTBEAT_SECONDS": "1", "QUANTSEARCH_GRACE_SECONDS": "3"}
    first = _machine(tmp_path / "a", space, **quick)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout or []), daemon=True)
    reader.start()
    # Machine a has trained a trial and started another: kill it mid-trial.
    deadline = time.monotonic() + 240
    study = None
    while time.monotonic() < deadline:
        done = _trained("".join(lines))
        if done:
            study = optuna.load_study(study_name="small", storage=postgres_url)
            if any(t.state == TrialState.RUNNING for t in study.get_trials()):
                break
        time.sleep(0.2)
    assert study is not None, "".join(lines)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed_done = _trained("".join(lines))

    second = _machine(tmp_path / "b", space, **quick)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err

    trials = optuna.load_study(study_name="small", storage=postgres_url).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all("no heartbeat for 3 s" in t.user_attrs["fail_reason"] for t in failed)
    # Every failed trial ran again, and nothing trained twice.
    assert {t.user_attrs.get("retry_of") for t in trials} >= {t.number for t in failed}
    assert not killed_done & _trained(out)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 10

    # A third machine: neither a's nor b's folder, only the database and the artifact store.
    shutil.rmtree(tmp_path / "a")
    number = min(killed_done)
    third = tmp_path / "c"
    third.mkdir()
    run = _quantsearch(third, "export", "--storage", postgres_url, "--study", "small",
                       "--trial", str(number), "--out", "model")
    assert run.returncode == 0, run.stderr
    exported = __import__("json").loads((third / "model" / "export.json").read_text())
    stored = next(t for t in trials if t.number == number).user_attrs["test_accuracy"]
    assert exported["reloaded_accuracy"] == stored


@pytest.mark.slow
def test_eight_workers_on_two_machines_lose_nothing_and_train_nothing_twice(
    tmp_path: Path, postgres_url: str
) -> None:
    n_trials = 24
    space = write_space(tmp_path, n_trials=n_trials, storage=postgres_url,
                        float_train={"epochs": 1}, artifacts=str(tmp_path / "nfs"))
    machines = [_machine(tmp_path / name, space, "--jobs", "4") for name in ("a", "b")]
    outputs = [m.communicate(timeout=900) for m in machines]
    for machine, (_, err) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, err
    trials = optuna.load_study(study_name="small", storage=postgres_url).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert n_trials <= len(trials) <= n_trials + 8  # each worker may start the last trial
    ran = [_trained(out) for out, _ in outputs]
    assert not ran[0] & ran[1]  # no trial trained on both machines
    reused = {t.number for t in trials if "duplicate_of" in t.user_attrs}
    assert ran[0] | ran[1] | reused == {t.number for t in trials}  # none lost
    # A trial that trained (not a reused result) has its checkpoint in the shared store.
    stored = {p.name for p in (tmp_path / "nfs").iterdir()}
    for trial in trials:
        if trial.number not in reused:
            assert trial.user_attrs["checkpoint_artifact"] in stored
