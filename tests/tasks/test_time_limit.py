"""A task function that never returns is stopped with a message naming it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from quantsearch.tasks import TASK_TIMEOUT_ENV, TaskError, get_task, task_time_limit, time_limit

HANGS = {
    "busy": "def make_task(data_dir=None, options=None, seed=0):\n    while True:\n        pass\n",
    "sleeping": "import time\n\ndef make_task(data_dir=None, options=None, seed=0):\n"
    "    time.sleep(3600)\n",
    "importing": "import time\ntime.sleep(3600)\n\ndef make_task(**kwargs):\n    pass\n",
}


@pytest.mark.parametrize("kind", sorted(HANGS))
def test_a_task_function_that_never_returns_is_stopped_by_name(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TASK_TIMEOUT_ENV, "0.5")
    path = tmp_path / f"{kind}.py"
    path.write_text(HANGS[kind])
    started = time.monotonic()
    with pytest.raises(TaskError) as info:
        get_task(f"{path}:make_task")
    assert str(info.value) == (
        f"the task function {path}:make_task did not finish within 0.5 s; if it is only slow, "
        f"raise the limit: {TASK_TIMEOUT_ENV}=SECONDS (0: no limit)"
    )
    assert time.monotonic() - started < 60  # stopped, not waited out
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_limit_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TASK_TIMEOUT_ENV, raising=False)
    assert task_time_limit() == 600.0
    monkeypatch.setenv(TASK_TIMEOUT_ENV, "0")
    assert task_time_limit() == 0.0
    monkeypatch.setenv(TASK_TIMEOUT_ENV, "soon")
    with pytest.raises(TaskError, match=f"{TASK_TIMEOUT_ENV}='soon' is not a number of seconds"):
        task_time_limit()


def test_an_enclosing_limit_keeps_running_after_an_inner_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TASK_TIMEOUT_ENV, "30")
    with time_limit("outer"):
        with time_limit("inner"):
            pass
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < left <= 30
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
