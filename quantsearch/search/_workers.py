"""Where trials train: in the study's own process, or in worker processes it feeds.

The study's process alone talks to the Optuna storage (so SQLite never sees two writers); a
worker receives a :class:`Job` (a trial to train, a sensitivity to measure), runs it and sends
back its result.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from quantsearch._malloc import keep_freed_memory

__all__ = [
    "WORKER_DIED",
    "Heartbeat",
    "InlinePool",
    "Job",
    "ProcessPool",
    "available_cores",
    "threads_per_worker",
    "worker_devices",
]

# How often a waiting study checks that its workers are still alive, and a worker that its
# study's process is, in seconds.
_POLL_SECONDS = 1.0
# Linux's prctl option: the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1
# The start of a trial's fail_reason when its worker process died under it.
WORKER_DIED = "worker process died"


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_devices(
    device: str, jobs: int, *, given: Sequence[str] | None = None, cuda_count: int | None = None
) -> list[str | None]:
    """The device of each of ``jobs`` workers (None: the trial's own ``train.device``).

    ``given`` devices in turn; else, when trials train on ``cuda`` or ``auto`` and there are
    several GPUs, ``cuda:0`` .. ``cuda:N-1`` in turn, one GPU per worker.
    """
    if given:
        return [given[index % len(given)] for index in range(jobs)]
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count()
    if device in ("cuda", "auto") and cuda_count > 1:
        return [f"cuda:{index % cuda_count}" for index in range(jobs)]
    return [None] * jobs


class Job(Protocol):
    """What a pool runs: picklable, numbered, and never touching the Optuna storage."""

    number: int

    def run(self) -> Any:
        """Do the work; the result goes back to the study's process."""

    def on_device(self, device: str) -> Job:
        """The same job, run on ``device``."""

    def died(self, reason: str) -> Any:
        """The result that stands for the job when its worker process died running it
        (``reason``: that it died, and its exit code)."""


def threads_per_worker(jobs: int) -> int:
    """Torch threads for each of ``jobs`` workers, so that together they fill the cores."""
    return max(1, available_cores() // jobs)


class InlinePool:
    """One trial at a time, trained in this process when its result is asked for."""

    def __init__(self) -> None:
        self._job: Job | None = None

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._job = None

    @property
    def has_capacity(self) -> bool:
        return self._job is None

    def submit(self, job: Job) -> None:
        assert self._job is None, "InlinePool takes one job at a time"
        self._job = job

    def next_result(self) -> tuple[int, Any]:
        job, self._job = self._job, None
        assert job is not None, "no job was submitted"
        return job.number, job.run()

    def terminate(self) -> None:
        self._job = None


def _die_with_parent(parent: int) -> None:
    """End this worker when the study's process ends, even by SIGKILL (no orphan trains on).

    On Linux the kernel sends SIGKILL at the parent's death; everywhere a thread also watches
    the parent's pid, which changes (to a reaper's) once the parent is gone.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="quantsearch-parent-watch", daemon=True).start()


def _worker_main(
    inbox: Any, outbox: Any, index: int, num_threads: int, parent: int, device: str | None
) -> None:
    _die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the study's process decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(num_threads)
    keep_freed_memory()
    while True:
        job = inbox.get()
        if job is None:
            return
        if device is not None:
            job = job.on_device(device)
        outbox.put((index, job.number, job.run()))


@dataclass
class _Worker:
    process: Any
    inbox: Any
    job: Job | None = None


class ProcessPool:
    """``jobs`` spawned worker processes, each running one job at a time.

    A worker that dies (killed, out of memory) is replaced; its job's result is
    ``job.died(reason)`` with the exit code (a trial fails; the study goes on).
    """

    def __init__(
        self, jobs: int, *, num_threads: int, devices: Sequence[str | None] | None = None
    ) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._outbox = self._context.Queue()
        self._num_threads = num_threads
        self._devices = list(devices or [None] * jobs)
        self._workers = [self._start(index) for index in range(jobs)]

    def _start(self, index: int) -> _Worker:
        inbox = self._context.Queue()
        process = self._context.Process(
            target=_worker_main,
            args=(
                inbox, self._outbox, index, self._num_threads, os.getpid(), self._devices[index]
            ),
            name=f"quantsearch-worker-{index}",
            daemon=True,
        )
        process.start()
        return _Worker(process=process, inbox=inbox)

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def has_capacity(self) -> bool:
        return any(worker.job is None for worker in self._workers)

    def submit(self, job: Job) -> None:
        worker = next(w for w in self._workers if w.job is None)
        worker.job = job
        worker.inbox.put(job)

    def next_result(self) -> tuple[int, Any]:
        while True:
            try:
                index, number, outcome = self._outbox.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                dead = self._replace_dead()
                if dead is not None:
                    return dead
                continue
            self._workers[index].job = None
            return number, outcome

    def _replace_dead(self) -> tuple[int, Any] | None:
        for index, worker in enumerate(self._workers):
            if worker.process.is_alive():
                continue
            job, code = worker.job, worker.process.exitcode
            self._workers[index] = self._start(index)
            if job is not None:
                return job.number, job.died(f"{WORKER_DIED} (exit code {code})")
        return None

    def close(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.inbox.put(None)
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join()

    def terminate(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self._workers:
            worker.process.join()


class Heartbeat:
    """Records a heartbeat for the running trials every ``interval`` seconds, in a thread.

    Only storages with heartbeats (RDB with ``heartbeat_interval``) need it: it is how other
    machines tell a live trial from one whose process died.
    """

    def __init__(self, beat: Callable[[Iterable[int]], None], interval: float) -> None:
        self._beat = beat
        self._interval = interval
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quantsearch-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._trial_ids.add(trial_id)
        self._beat([trial_id])

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._trial_ids)
            self._beat(ids)
