"""Trials trained in worker processes while the study's process alone writes the storage."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from quantsearch.search import load_space, prepare, run_study, study_location
from quantsearch.search._workers import threads_per_worker

SpaceFile = Callable[..., Path]

# A task whose model kills the process that builds it, unless that is the study's process.
DYING_TASK = """
import os
from dataclasses import replace

from quantsearch.tasks import get_task


def _build():
    if str(os.getpid()) != os.environ["QS_STUDY_PID"]:
        os._exit(3)
    return get_task("digits").build_model()


def make_task(data_dir=None, options=None, seed=0):
    return replace(get_task("digits", options={"limit": 100}, seed=seed), build_model=_build)
"""


def test_threads_are_split_between_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantsearch.search._workers.available_cores", lambda: 8)
    assert threads_per_worker(1) == 8
    assert threads_per_worker(2) == 4
    assert threads_per_worker(3) == 2
    assert threads_per_worker(16) == 1


@pytest.mark.slow
def test_two_workers_run_a_study(space_file: SpaceFile) -> None:
    spec = load_space(space_file(n_trials=6))
    study = run_study(prepare(spec), jobs=2)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["float", "uniform-8"]
    root = study_location(spec).root
    assert all((root / t.user_attrs["checkpoint"]).is_file() for t in trials)
    # Workers trained with their own seeds, as in one process.
    assert len({t.user_attrs["seed"] for t in trials}) == 6


@pytest.mark.slow
def test_a_dying_worker_fails_its_trial_and_is_replaced(
    space_file: SpaceFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_file = tmp_path / "dying_task.py"
    task_file.write_text(DYING_TASK)
    monkeypatch.setenv("QS_STUDY_PID", str(os.getpid()))
    spec = load_space(
        space_file(
            n_trials=3,
            task=f"{task_file}:make_task",
            baselines={"float": False},
            per_layer=None,
            params={"quant_bits": {"_type": "choice", "_value": [4, 8]}},
            quantize={"weight": {"op_types": ["Linear"]}},
        )
    )
    study = run_study(prepare(spec), jobs=2)
    trials = study.get_trials()
    # Each of the 3 trials ran once more after its worker died, and died again.
    assert [t.state.name for t in trials] == ["FAIL"] * 6
    assert {t.user_attrs["fail_reason"] for t in trials} == {
        "worker process died (exit code 3) while training"
    }
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert len(retries) == 3
    originals = {t.user_attrs["retry_of"] for t in retries}
    assert len(originals) == 3
    assert all("retry_of" not in trials[n].user_attrs for n in originals)
    assert all(t.params == trials[t.user_attrs["retry_of"]].params for t in retries)


def test_each_worker_gets_one_gpu_when_trials_train_on_cuda() -> None:
    from quantsearch.search._workers import worker_devices

    assert worker_devices("cuda", 3, cuda_count=2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("auto", 2, cuda_count=4) == ["cuda:0", "cuda:1"]
    # One GPU or none, or trials on the CPU: every worker keeps the trial's own device.
    assert worker_devices("cuda", 2, cuda_count=1) == [None, None]
    assert worker_devices("cpu", 2, cuda_count=4) == [None, None]
    assert worker_devices("auto", 3, given=["cuda:1", "cpu"], cuda_count=0) == [
        "cuda:1", "cpu", "cuda:1"
    ]


def test_devices_on_the_command_line_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from quantsearch.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["study", "--space", "x.yaml", "--devices", "gpu0"])
    assert stop.value.code == 2
    assert "argument --devices: 'gpu0' is not cpu or cuda:N" in capsys.readouterr().err
