"""A time limit on the user's own code (a task function, a model's first forward pass), so a
function that never returns is a clear error instead of a silent hang."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from quantsearch.tasks._errors import TaskError

__all__ = ["TASK_TIMEOUT_ENV", "TaskTimeoutError", "task_time_limit", "time_limit"]

#: The environment variable that sets the limit in seconds (0: none).
TASK_TIMEOUT_ENV = "QUANTSEARCH_TASK_TIMEOUT"
_DEFAULT_SECONDS = 600.0


class TaskTimeoutError(TaskError):
    """The user's code ran past the time limit (passed through, never wrapped)."""


def task_time_limit() -> float:
    """Seconds the user's task code may take (``QUANTSEARCH_TASK_TIMEOUT``; 0 or less: none)."""
    raw = os.environ.get(TASK_TIMEOUT_ENV, "").strip()
    if not raw:
        return _DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        raise TaskError(
            f"{TASK_TIMEOUT_ENV}={raw!r} is not a number of seconds (0 turns the limit off)"
        ) from None
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


@contextlib.contextmanager
def time_limit(what: str) -> Iterator[None]:
    """Raise TaskError naming ``what`` if the block runs longer than :func:`task_time_limit`.

    Only the main thread can take the alarm: elsewhere (and with the limit off) the block runs
    without one. An enclosing limit keeps running and is restored afterwards.
    """
    seconds = task_time_limit()
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TaskTimeoutError(
            f"{what} did not finish within {seconds:g} s; if it is only slow, raise the limit: "
            f"{TASK_TIMEOUT_ENV}=SECONDS (0: no limit)"
        )

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            # The enclosing limit goes on with what it had left (at least a moment).
            left = max(outer - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left)
