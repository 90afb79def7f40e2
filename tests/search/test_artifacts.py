"""Checkpoints and the float model in an artifact store: a shared folder or S3 (moto's server)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantsearch.pipeline import (
    ArtifactError,
    StudyRecord,
    TrialRecord,
    fetch_artifact,
    file_sha256,
    open_artifact_store,
)
from quantsearch.search import load_space, prepare, run_study, study_location

from ._spaces import write_space


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def count(self, label: str, done: int, total: int) -> None:
        pass

    def start(self, **_: int) -> None:
        pass

    def trial(self, *_: object, **__: int) -> None:
        pass

    def close(self) -> None:
        pass


def _stored_files(store: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in store.iterdir()}


def test_every_checkpoint_and_the_float_model_go_to_the_store(tmp_path: Path) -> None:
    space = write_space(tmp_path, n_trials=3, artifacts="shared", float_train={"epochs": 1})
    study = run_study(prepare(load_space(space)))
    files = _stored_files(tmp_path / "shared")
    record = StudyRecord.of(study)
    assert record.artifacts == str(tmp_path / "shared")
    assert record.float_model is not None and record.float_model.artifact in files
    for trial in study.trials:
        trial_record = TrialRecord.of(trial)
        assert trial_record.checkpoint_artifact is not None
        # The stored bytes are the checkpoint's.
        assert files[trial_record.checkpoint_artifact] == trial_record.checkpoint_sha256
    assert len(files) == 4


def test_a_machine_without_the_float_model_downloads_it(tmp_path: Path) -> None:
    space = write_space(tmp_path, n_trials=2, artifacts="shared", float_train={"epochs": 1})
    spec = load_space(space)
    run_study(prepare(spec))
    float_file = study_location(spec).float_model
    float_file.unlink()
    log = _Log()
    run_study(prepare(spec.with_overrides(n_trials=3)), progress=log)
    assert f"float model: downloaded from {tmp_path / 'shared'} ({float_file})" in log.lines
    assert float_file.is_file()


def test_a_missing_or_damaged_artifact_is_one_clear_error(tmp_path: Path) -> None:
    store = open_artifact_store(str(tmp_path / "store"))
    with pytest.raises(ArtifactError) as missing:
        fetch_artifact(store, "nope", tmp_path / "out.pt", what="the checkpoint of trial 3")
    assert str(missing.value) == (
        f"the checkpoint of trial 3 is missing from artifact store {tmp_path / 'store'} "
        "(artifact nope)"
    )
    (tmp_path / "store" / "abc").write_bytes(b"changed bytes")
    with pytest.raises(ArtifactError, match=r"the checkpoint of trial 3 in artifact store .* is "
                       r"damaged \(artifact abc: its bytes differ from the ones stored\)"):
        fetch_artifact(store, "abc", tmp_path / "out.pt", what="the checkpoint of trial 3",
                       sha256="0" * 64)
    assert not (tmp_path / "out.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_store_that_is_not_a_folder_or_s3_url_is_refused_in_the_space(tmp_path: Path) -> None:
    from quantsearch.search import SpaceError

    with pytest.raises(SpaceError, match=r"artifacts: 'gs://b/p' is not an artifact store: give "
                       r"a folder or s3://bucket/prefix \(no other scheme is supported\)"):
        load_space(write_space(tmp_path, artifacts="gs://b/p"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3-compatible server on loopback, with boto3's environment pointed at it."""
    pytest.importorskip("boto3")
    server = shutil.which("moto_server") or pytest.skip("moto's server (moto[server]) missing")
    port = _free_port()
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_s3_store_holds_the_study_under_its_prefix(tmp_path: Path, s3_server: str) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="models")
    space = write_space(
        tmp_path, n_trials=2, artifacts="s3://models/studies/small", float_train={"epochs": 1}
    )
    study = run_study(prepare(load_space(space)))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="models")["Contents"]}
    ids = {TrialRecord.of(t).checkpoint_artifact for t in study.trials}
    float_id = StudyRecord.of(study).float_model.artifact  # type: ignore[union-attr]
    assert keys == {f"studies/small/{i}" for i in {*ids, float_id}}
    # Nothing of the credentials is stored with the study.
    assert "testing" not in str(study.user_attrs) + str([t.user_attrs for t in study.trials])


def test_an_unreachable_bucket_is_an_artifact_error(s3_server: str) -> None:
    with pytest.raises(ArtifactError, match=r"artifact store s3://absent/x: cannot reach the "
                       r"bucket \("):
        open_artifact_store("s3://absent/x")




def test_export_fetches_a_checkpoint_this_machine_does_not_have(tmp_path: Path) -> None:
    import json

    from quantsearch.cli import main

    space = write_space(tmp_path, n_trials=2, artifacts="shared", float_train={"epochs": 1})
    spec = load_space(space)
    study = run_study(prepare(spec))
    shutil.rmtree(study_location(spec).folder)  # as on a machine that trained nothing
    out = tmp_path / "export"
    assert main(["export", "--space", str(space), "--trial", "1", "--out", str(out)]) == 0
    exported = json.loads((out / "export.json").read_text())
    assert exported["reloaded_accuracy"] == TrialRecord.of(study.trials[1]).test_accuracy
    assert not any(p.name.startswith(".trial_") for p in out.iterdir())  # the fetched copy went


def test_export_names_the_trial_and_the_store_when_the_artifact_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quantsearch.cli import main

    space = write_space(tmp_path, n_trials=2, artifacts="shared", float_train={"epochs": 1})
    spec = load_space(space)
    study = run_study(prepare(spec))
    shutil.rmtree(study_location(spec).folder)
    artifact = TrialRecord.of(study.trials[1]).checkpoint_artifact
    (tmp_path / "shared" / str(artifact)).unlink()
    out = tmp_path / "export"
    assert main(["export", "--space", str(space), "--trial", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"quantsearch: error: the checkpoint of trial 1 is missing from artifact store "
        f"{tmp_path / 'shared'} (artifact {artifact})\n"
    )
