"""Trials left behind by a dead process or machine: failed with a reason and queued again."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, Trial, TrialState

from quantsearch.pipeline import StudyLocation, TrialRecord
from quantsearch.search._errors import SpaceError

__all__ = [
    "GRACE_ENV",
    "GRACE_SECONDS",
    "HEARTBEAT_ENV",
    "HEARTBEAT_SECONDS",
    "beat",
    "fail_and_requeue",
    "fail_stale_trials",
    "grace_seconds",
    "heartbeat_seconds",
    "requeue_interrupted",
    "requeue_stale",
    "retry_attrs",
    "trial_id",
]

#: Environment variables that set the two below, for operators (and end-to-end tests).
HEARTBEAT_ENV = "QUANTSEARCH_HEARTBEAT_SECONDS"
GRACE_ENV = "QUANTSEARCH_GRACE_SECONDS"


# Seconds between heartbeats of running trials on a shared (non-SQLite) database, and how
# long a trial may go without one before another machine fails and re-queues it.
HEARTBEAT_SECONDS = 20
GRACE_SECONDS = 90


def _seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SpaceError(f"{raw!r} is not a whole number of seconds >= 1", key=name)
    return int(raw)


def heartbeat_seconds() -> int:
    """Seconds between heartbeats (``QUANTSEARCH_HEARTBEAT_SECONDS``, default 20)."""
    return _seconds(HEARTBEAT_ENV, HEARTBEAT_SECONDS)


def grace_seconds() -> int:
    """Seconds without a heartbeat before a trial is failed and queued again
    (``QUANTSEARCH_GRACE_SECONDS``, default 90)."""
    return _seconds(GRACE_ENV, GRACE_SECONDS)


def trial_id(trial: Trial | FrozenTrial) -> int:
    # Optuna keys its storage by this id; it has no public accessor.
    return trial._trial_id


def retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The user attributes of the queued retry of ``trial``."""
    record = TrialRecord.of(trial)
    retry = TrialRecord(retry_of=trial.number, baseline=record.baseline, seed_of=record.seed_of)
    return retry.model_dump(include={"retry_of", "baseline", "seed_of"}, exclude_none=True)


def requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Called on a trial failed for its missing heartbeat: queue its parameters again."""
    study.enqueue_trial(trial.params, user_attrs=retry_attrs(trial))


def fail_stale_trials(study: optuna.Study) -> None:
    """optuna's fail_stale_trials, writing each trial's fail_reason while it is still RUNNING.

    A finished trial takes no attribute, so optuna's own function leaves it without a reason.
    Whichever process moves the trial to FAIL queues it again; the others skip it.
    """
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return
    for stale in storage._get_stale_trial_ids(study._study_id):
        try:
            reason = (
                f"interrupted: no heartbeat for {grace_seconds()} s (its machine or process "
                "died) mid-trial"
            )
            storage.set_trial_user_attr(stale, "fail_reason", reason)
            if not storage.set_trial_state_values(stale, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
        requeue_stale(study, storage.get_trial(stale))


def fail_and_requeue(study: optuna.Study, trial: Trial | FrozenTrial, reason: str) -> None:
    """Fail a RUNNING trial (of this or a dead process) with a reason; queue it again."""
    frozen = study.get_trials(deepcopy=False)[trial.number]
    # A trial of a dead process has no Trial object here; write through the storage.
    study._storage.set_trial_user_attr(trial_id(frozen), "fail_reason", reason)
    study.tell(frozen.number, state=TrialState.FAIL)
    study.enqueue_trial(frozen.params, user_attrs=retry_attrs(frozen))


def requeue_interrupted(study: optuna.Study, location: StudyLocation | None = None) -> list[int]:
    """Fail the RUNNING trials of a dead process and queue their parameters again.

    Call only while holding the study's lock (so no live process owns those trials). A
    checkpoint such a trial left in the ``location``'s folder is deleted: no trial the study
    holds wrote it, so nothing may ever take it.
    """
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        fail_and_requeue(
            study, trial, "interrupted: its process stopped (killed or crashed) mid-trial"
        )
        if location is not None:
            location.checkpoint(trial.number).unlink(missing_ok=True)
    return [t.number for t in stale]


def beat(study: optuna.Study) -> Callable[[Iterable[int]], None]:
    """A function that records a heartbeat for each given trial id."""
    storage = study._storage

    def record(trial_ids: Iterable[int]) -> None:
        for running in trial_ids:
            storage.record_heartbeat(running)

    return record
