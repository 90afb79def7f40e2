"""The trial loop: ask, reuse a finished twin, train on the pool, tell, until the study is done."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from quantsearch.pipeline import (
    ArtifactError,
    ArtifactStore,
    LatencyTable,
    TrialRecord,
    file_sha256,
    store_artifact,
    trial_mode,
)
from quantsearch.search._config_builder import config_key
from quantsearch.search._objective import TrialJob, TrialOutcome, trial_seed
from quantsearch.search._prepare import StudyContext
from quantsearch.search._progress import FINISHED, Progress, TrialReport, counted_trials, front_size
from quantsearch.search._recovery import fail_and_requeue, fail_stale_trials, retry_attrs, trial_id
from quantsearch.search._seed_guide import SeedGuide
from quantsearch.search._spec import SearchSpec
from quantsearch.search._target import (
    TargetState,
    constraint_values,
    reached,
    target_words,
)
from quantsearch.search._workers import WORKER_DIED, Heartbeat, InlinePool, ProcessPool

__all__ = ["TrialLoop"]

# How often a process with nothing to train but trials waiting on other machines reads again.
_ELSEWHERE_POLL_SECONDS = 2.0


@dataclass
class _Ticket:
    trial: Trial
    config_list: list[dict[str, Any]]
    train: dict[str, Any]
    key: str
    baseline: str | None
    retry_of: int | None
    seed: int


@dataclass
class TrialLoop:
    study: optuna.Study
    context: StudyContext
    progress: Progress
    # Set on a shared database (no lock file): other machines add and fail trials too.
    heartbeat: Heartbeat | None = None
    # The weights every trial starts from; None when trials train from scratch.
    float_model_path: Path | None = None
    # Where checkpoints go for every machine to reach (None: the artifacts folder only).
    store: ArtifactStore | None = None
    in_flight: dict[int, _Ticket] = field(default_factory=dict)
    # Trials waiting for a running twin (same config_list) instead of training it again.
    parked: dict[str, list[_Ticket]] = field(default_factory=dict)
    # Parked trials whose twin failed: they train after all.
    unparked: list[_Ticket] = field(default_factory=list)
    # Shared database: trials whose parameters another process is training right now, by the
    # number of that running trial; they take its result once it lands.
    parked_elsewhere: dict[int, list[_Ticket]] = field(default_factory=dict)
    # The finished trial of each config key (the lowest-numbered one): a repeated key reuses
    # its result. Filled from every read of the trials, each finished trial keyed once.
    finished: dict[str, FrozenTrial] = field(default_factory=dict)
    _keyed: set[int] = field(default_factory=set)
    # The trials as last read, their counted_trials, and the trials asked since that read.
    _trials: list[FrozenTrial] = field(default_factory=list)
    _counted: int = 0
    _asked_since_read: int = 0
    # The target (smallest model within an accuracy drop): the study stops once it is met.
    target: TargetState | None = None
    _target_trial: int | None = None
    # Queues the sensitivity's predicted front, a trial at a time, before the sampler's own.
    guide: SeedGuide | None = None
    # The study's per-layer latency table (``latency: {table: true}``), given to each trial.
    latency_table: LatencyTable | None = None

    @property
    def spec(self) -> SearchSpec:
        return self.context.spec

    def run(self, pool: InlinePool | ProcessPool) -> None:
        trials = self._read_trials()
        self.progress.start(
            total=self.spec.n_trials, done=self._done(trials), front=self._front(trials)
        )
        try:
            while True:
                self._fill(pool)
                if not self.in_flight:
                    if not self.parked_elsewhere:
                        break
                    time.sleep(_ELSEWHERE_POLL_SECONDS)  # nothing here to wait on but others
                    self._read_trials()
                    self._take_elsewhere()
                    continue
                number, outcome = pool.next_result()
                ticket = self.in_flight.pop(number)
                self._finish(ticket, outcome)
                self._retry_died(ticket, outcome)
        except BaseException:
            pool.terminate()
            self._abandon("interrupted: the study process stopped before the trial finished")
            raise

    def _front(self, trials: Sequence[FrozenTrial]) -> int:
        return front_size(trials, self.context.directions)

    def _retry_died(self, ticket: _Ticket, outcome: TrialOutcome) -> None:
        """A trial whose worker died runs once more (not a retry's retry: that is the trial)."""
        trial = ticket.trial
        reason = outcome.record.fail_reason or ""
        if outcome.state != "FAIL" or not reason.startswith(WORKER_DIED):
            return
        if TrialRecord.of(trial).retry_of is not None:
            return
        self.study.enqueue_trial(trial.params, user_attrs=retry_attrs(trial))
        self._read_trials()  # the failure no longer counts; its retry does, once asked

    def _running_elsewhere(self, ticket: _Ticket) -> int | None:
        """The number of a RUNNING trial of another process with this ticket's parameters."""
        if self.heartbeat is None:
            return None
        number = ticket.trial.number
        params = ticket.trial.params
        for trial in self._trials:
            if (
                trial.state == TrialState.RUNNING
                and trial.number != number
                and trial.number not in self.in_flight
                and trial.params == params
                and TrialRecord.of(trial).baseline == ticket.baseline
            ):
                return trial.number
        return None

    def _take_elsewhere(self) -> None:
        """Parked tickets whose twin elsewhere finished: take its result, or train after all."""
        states = {t.number: t.state for t in self._trials}
        for number in list(self.parked_elsewhere):
            if states.get(number) == TrialState.RUNNING:
                continue
            for ticket in self.parked_elsewhere.pop(number):
                original = self.finished.get(ticket.key)
                if original is not None:
                    self._tell_duplicate(ticket, original)
                else:
                    self.unparked.append(ticket)

    def _done(self, trials: Sequence[FrozenTrial]) -> int:
        """Counted trials not running, of ``trials`` as ``_read_trials`` just read them."""
        return self._counted - sum(t.state == TrialState.RUNNING for t in trials)

    def _read_trials(self) -> list[FrozenTrial]:
        """Read all trials from the storage; key its newly finished trials in ``finished``."""
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state not in FINISHED or trial.number in self._keyed:
                continue
            self._keyed.add(trial.number)
            record = TrialRecord.of(trial)
            if record.config_list is not None:
                key = config_key(record.config_list, record.train)
                known = self.finished.get(key)
                if known is None or trial.number < known.number:
                    self.finished[key] = trial
        self._trials = trials
        self._counted = counted_trials(trials)
        self._asked_since_read = 0
        return trials

    def _counted_now(self) -> int:
        """counted_trials of the study as it is now.

        With the lock file this process alone writes the study, and each ask adds one counted
        trial (a new or WAITING trial becomes RUNNING) to the last read; on a shared database
        other machines change it, so the trials are read again.
        """
        if self.heartbeat is not None:
            self._read_trials()
        return self._counted + self._asked_since_read

    def _fill(self, pool: InlinePool | ProcessPool) -> None:
        if self.parked_elsewhere:
            self._take_elsewhere()
        while self.unparked and pool.has_capacity:
            self._submit(pool, self.unparked.pop(0))
        while pool.has_capacity:
            if self.heartbeat is not None:
                fail_stale_trials(self.study)
            if self._counted_now() >= self.spec.n_trials or self._target_met():
                return
            if self.guide is not None:
                self._queue_seed(self.guide)
            ticket = self._ask()
            original = self.finished.get(ticket.key)
            elsewhere = None if original is not None else self._running_elsewhere(ticket)
            if original is not None:
                self._tell_duplicate(ticket, original)
            elif any(t.key == ticket.key for t in self.in_flight.values()):
                # The same config_list is training right now: take its result when it lands.
                self.parked.setdefault(ticket.key, []).append(ticket)
            elif elsewhere is not None:
                # Another machine trains these parameters now: wait for its result instead.
                self.parked_elsewhere.setdefault(elsewhere, []).append(ticket)
            else:
                self._submit(pool, ticket)

    def _queue_seed(self, guide: SeedGuide) -> None:
        """Queue the guide's next seed; once it has ended, say why (once) and drop it."""
        trials = self._read_trials()
        if guide.queue_next(self.study, trials):
            return
        reason = guide.ended(trials, [TrialRecord.of(t) for t in trials])
        if reason is not None:
            self.progress.message(f"seeds: {reason}; the sampler goes on alone")
            self.guide = None

    def _target_met(self) -> bool:
        """Whether a trial within the target is as small as the space allows (said once)."""
        if self.target is None:
            return False
        if self._target_trial is None:
            best = reached(self._trials, self.target)
            if best is None:
                return False
            self._target_trial = best.number
            self.progress.message(
                f"target: trial {best.number} {target_words(self.target)} at the smallest "
                "size the space allows; no more trials"
            )
        return True

    def _ask(self) -> _Ticket:
        plan = self.context.plan
        with warnings.catch_warnings():
            # Optuna expects heartbeats from Study.optimize; here the Heartbeat thread sends them.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask(plan.distributions)
        self._asked_since_read += 1
        if self.heartbeat is not None:
            self.heartbeat.add(trial_id(trial))
        values = plan.values(trial.params)
        queued = TrialRecord.from_attrs(trial.user_attrs)
        config_list = [] if queued.baseline == "float" else plan.config_list(values)
        train = plan.train_overrides(values)
        return _Ticket(
            trial=trial,
            config_list=config_list,
            train=train,
            key=config_key(config_list, train),
            baseline=queued.baseline,
            retry_of=queued.retry_of,
            seed=trial_seed(self.spec.seed, trial.number),
        )

    def _submit(self, pool: InlinePool | ProcessPool, ticket: _Ticket) -> None:
        spec = self.spec
        number = ticket.trial.number
        job = TrialJob(
            number=number,
            seed=ticket.seed,
            task=spec.task,
            task_seed=spec.seed,
            algorithm=spec.algorithm,
            mode=trial_mode(spec.algorithm, ticket.config_list, from_scratch=spec.from_scratch),
            # Threads are set once per process (run_study, workers), not per trial.
            train={k: v for k, v in {**spec.train, **ticket.train}.items() if k != "num_threads"},
            searched_train=ticket.train,
            config_list=ticket.config_list,
            objectives=spec.objectives,
            fidelity=spec.metric_names,
            float_weights=None if self.float_model_path is None else str(self.float_model_path),
            calibration_batches=spec.calibration_batches,
            checkpoint=str(self.context.location.checkpoint(number)),
            hopeless=spec.hopeless,
            latency=spec.latency,
            latency_table=self.latency_table,
            latency_source=spec.latency_source,
        )
        self.in_flight[number] = ticket
        pool.submit(job)

    def _finish(self, ticket: _Ticket, outcome: TrialOutcome) -> None:
        trial = ticket.trial
        spec = self.spec
        identity = {"baseline": ticket.baseline, "retry_of": ticket.retry_of}
        if outcome.record.config_list is None:  # a worker that died reports only why
            identity.update(
                algorithm=spec.algorithm,
                mode=trial_mode(spec.algorithm, ticket.config_list, from_scratch=spec.from_scratch),
                config_list=ticket.config_list,
                train=ticket.train,
                seed=ticket.seed,
            )
        record = outcome.record.model_copy(update=identity)
        state = outcome.state
        if state == "COMPLETE":
            record = self._completed(trial, record)
            if record.fail_reason is not None:
                state = "FAIL"
        self._tell(ticket, state, record, outcome.values)
        twins = self.parked.pop(ticket.key, [])
        if not twins:
            return
        finished = self._trials[trial.number]  # as read by _tell
        for twin in twins:
            if finished.state in FINISHED:
                self._tell_duplicate(twin, finished)
            else:
                self.unparked.append(twin)

    def _completed(self, trial: Trial, record: TrialRecord) -> TrialRecord:
        """A complete trial's record with its sizes and checkpoint (stored in the artifact
        store when there is one: a store that fails fails the trial, never the study)."""
        location = self.context.location
        float_size = self.context.float_size_bytes
        checkpoint = location.checkpoint(trial.number)
        update: dict[str, Any] = {
            "float_size_bytes": float_size,
            "compression_ratio": float_size / record.size_bytes,
            "float_bitops": self.context.float_bitops,
            "checkpoint": location.stored(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint),
        }
        if self.store is not None:
            try:
                update["checkpoint_artifact"] = store_artifact(self.store, checkpoint, trial)
            except ArtifactError as error:
                update["fail_reason"] = f"checkpoint not stored: {error}"
        return record.model_copy(update=update)

    def _tell_duplicate(self, ticket: _Ticket, original: FrozenTrial) -> None:
        record = TrialRecord.of(original).reused_by(
            seed=ticket.seed,
            baseline=ticket.baseline,
            retry_of=ticket.retry_of,
            config_list=ticket.config_list,
            train=ticket.train,
            duplicate_of=original.number,
            train_seconds=0.0,
        )
        if original.state == TrialState.PRUNED:
            record = record.model_copy(
                update={
                    "fail_reason": f"same config_list as trial {original.number}, which was "
                    f"stopped: {TrialRecord.of(original).fail_reason}"
                }
            )
        values = tuple(original.values) if original.values is not None else ()
        self._tell(ticket, original.state.name, record, values)

    def _tell(
        self, ticket: _Ticket, state: str, record: TrialRecord, values: Sequence[float]
    ) -> None:
        trial = ticket.trial
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        if state == "COMPLETE":
            for name, value in constraint_values(self.spec.constraints, record).items():
                trial.set_constraint(name, value)
            self.study.tell(trial, list(values))
        else:
            self.study.tell(trial, state=TrialState[state])
        if self.heartbeat is not None:
            self.heartbeat.discard(trial_id(trial))
        trials = self._read_trials()
        report = TrialReport(number=trial.number, state=state, record=record)
        self.progress.trial(report, done=self._done(trials), front=self._front(trials))

    def _abandon(self, reason: str) -> None:
        """Fail every trial this process holds and queue its parameters to run again."""
        tickets = [
            *self.in_flight.values(),
            *(t for ts in self.parked.values() for t in ts),
            *(t for ts in self.parked_elsewhere.values() for t in ts),
            *self.unparked,
        ]
        self.in_flight.clear()
        self.parked.clear()
        self.parked_elsewhere.clear()
        self.unparked.clear()
        for ticket in tickets:
            with contextlib.suppress(Exception):
                fail_and_requeue(self.study, ticket.trial, reason)
