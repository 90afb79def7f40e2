"""What a running study tells its user: the Progress protocol, and the counts it shows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from optuna.trial import FrozenTrial, TrialState

from quantsearch.pipeline import TrialRecord, front_trials

__all__ = ["FINISHED", "Progress", "Silent", "TrialReport", "counted_trials", "front_size"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class TrialReport:
    """One finished trial, as shown in the progress output."""

    number: int
    state: str
    record: TrialRecord


class Progress(Protocol):
    def message(self, text: str) -> None: ...

    def count(self, label: str, done: int, total: int) -> None:
        """Work before the trials (``label``: what): ``done`` of ``total`` steps."""

    def start(self, *, total: int, done: int, front: int) -> None: ...

    def trial(self, report: TrialReport, *, done: int, front: int) -> None: ...

    def close(self) -> None: ...


class Silent:
    def message(self, text: str) -> None:
        pass

    def count(self, label: str, done: int, total: int) -> None:
        pass

    def start(self, *, total: int, done: int, front: int) -> None:
        pass

    def trial(self, report: TrialReport, *, done: int, front: int) -> None:
        pass

    def close(self) -> None:
        pass


def counted_trials(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count towards n_trials: all but WAITING ones and failures run again."""
    retried = {TrialRecord.of(t).retry_of for t in trials}
    return sum(
        1
        for t in trials
        if t.state in (*FINISHED, TrialState.RUNNING)
        or (t.state == TrialState.FAIL and t.number not in retried)
    )


def front_size(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> int:
    """Trials on the Pareto front (as ``study.best_trials``), a reused result counted once."""
    return len(front_trials(trials, directions))
