"""The seeds of a search: the predicted Pareto set's configs, queued one trial at a time
while they keep reaching the front (``SeedGuide``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from quantsearch.pipeline import Bits, Sensitivity, TrialRecord, accuracy_interval
from quantsearch.search._config_builder import SpacePlan
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._predicted_front import seed_configs
from quantsearch.search._sensitivity_measure import ensure_sensitivity
from quantsearch.search._sensitivity_plan import searched_tensors
from quantsearch.search._spec import SearchSpec, SensitivitySpec
from quantsearch.search._workers import InlinePool, ProcessPool

__all__ = ["SEED_MARK", "SeedGuide", "seed_limit", "seed_study"]

#: ``TrialRecord.seed_of`` of a trial queued from the sensitivity's Pareto set.
SEED_MARK = "sensitivity"
# A seed trial that ended with a result (a failed one is retried or is an error, not a miss).
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def seed_limit(spec: SearchSpec) -> int:
    """The most seed trials: ``sensitivity.seeds``, else DEFAULT_SEEDS; never more than the
    trials left after the baselines."""
    count = (spec.sensitivity or SensitivitySpec()).max_seeds
    return max(0, min(count, spec.n_trials - len(spec.baselines.labels)))


@dataclass(frozen=True)
class SeedGuide:
    """Queues the predicted Pareto set's configs one trial at a time, while they pay off.

    The configs come in ``seed_configs`` order (the most predicted hypervolume first). The
    guide stops for good after ``patience`` finished seeds in a row that missed the front
    (``misses``: the prediction has stopped finding it), or when its configs are used up; the
    sampler then goes on alone. Everything it decides is read back from the trials, so a
    resumed study or another machine goes on where it was.
    """

    configs: tuple[dict[str, Bits], ...]
    """The seed configs' bits, in the order they are tried."""
    params: tuple[dict[str, Any], ...]
    """The same as Optuna parameters."""
    patience: int
    metric: str | None = "accuracy"
    """The quality metric a seed is judged by (the sensitivity's); None: no seed misses."""
    maximize: bool = True

    @classmethod
    def of(cls, spec: SearchSpec, plan: SpacePlan, sensitivity: Sensitivity) -> SeedGuide:
        options = spec.sensitivity or SensitivitySpec()
        baselines = [_baseline_bits(plan, label) for label in spec.baselines.labels]
        configs = seed_configs(
            sensitivity,
            seed_limit(spec),
            exclude=baselines,
            spread=options.spread,
        )
        params = []
        for bits in configs:
            encoded = {}
            for name, value in bits.items():
                param = plan.params[name]
                assert isinstance(param, NniParam)
                encoded[name] = param.encode(value)
            params.append(encoded)
        return cls(
            configs=tuple(configs),
            params=tuple(params),
            patience=options.patience,
            metric=sensitivity.metric,
            maximize=sensitivity.direction == "maximize",
        )

    def next_params(self, trials: Sequence[FrozenTrial]) -> dict[str, Any] | None:
        """The parameters of the next seed to queue, or None: a seed is still waiting, or
        the guide has ended (``ended``)."""
        records = [TrialRecord.of(t) for t in trials]
        waiting = any(
            t.state == TrialState.WAITING and r.seed_of == SEED_MARK
            for t, r in zip(trials, records, strict=True)
        )
        if waiting or self.ended(trials, records):
            return None
        return self._untried(trials)[0]

    def ended(self, trials: Sequence[FrozenTrial], records: Sequence[TrialRecord]) -> str | None:
        """Why no seed is queued any more, or None while the guide goes on."""
        if not self._untried(trials):
            return f"all {len(self.configs)} seed configs tried"
        if self.patience and self.misses(trials, records) >= self.patience:
            return f"{self.patience} seeds in a row missed the front"
        return None

    def _untried(self, trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
        """The seed configs no trial has (whatever its other parameters)."""
        if not self.params:
            return []
        names = list(self.params[0])
        tried = {tuple(t.params.get(n) for n in names) for t in trials}
        return [p for p in self.params if tuple(p[n] for n in names) not in tried]

    def misses(self, trials: Sequence[FrozenTrial], records: Sequence[TrialRecord]) -> int:
        """Finished seeds in a row, the latest last, that missed the front: another trial is
        at most as large and better (in the sensitivity's metric) than the seed's 95% interval
        reaches (a difference within the validation split's noise is no miss)."""
        metric = self.metric
        if metric is None:
            return 0
        done = [
            (t.number, r.metric(metric), r.size_bytes)
            for t, r in zip(trials, records, strict=True)
            if t.state == TrialState.COMPLETE
            and r.metric(metric) is not None
            and r.size_bytes is not None
        ]
        sign = 1.0 if self.maximize else -1.0
        misses = 0
        for trial, record in zip(trials, records, strict=True):
            if record.seed_of != SEED_MARK or trial.state not in _FINISHED:
                continue
            value, size = record.metric(metric), record.size_bytes
            if trial.state != TrialState.COMPLETE or value is None or size is None:
                misses += 1
                continue
            reach = _reach(record, metric, value, self.maximize)
            beaten = any(
                n != trial.number and s <= size and sign * v > sign * reach  # type: ignore[operator]
                for n, v, s in done
            )
            misses = misses + 1 if beaten else 0
        return misses

    def queue_next(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> bool:
        """Queue the next seed (``seed_of: sensitivity``) if there is one; whether it did."""
        params = self.next_params(trials)
        if params is None:
            return False
        attrs = TrialRecord(seed_of=SEED_MARK).model_dump(include={"seed_of"})
        study.enqueue_trial(params, user_attrs=attrs)
        return True


def _reach(record: TrialRecord, metric: str, value: float, maximize: bool) -> float:
    """The far end of the trial's 95% interval in the better direction (accuracy: Wilson on
    its validation examples; another metric: the stored interval), else its value."""
    interval = record.intervals.get(metric)
    if interval is None and metric == "accuracy":
        interval = accuracy_interval(value, record.val_samples or 0)
    if interval is None:
        return value
    reach = interval[1] if maximize else interval[0]
    return value if math.isnan(reach) else reach


def _baseline_bits(plan: SpacePlan, label: str) -> dict[str, Bits]:
    names = searched_tensors(plan)
    params = plan.baseline_params(label)
    out = {}
    for name in names:
        param = plan.params[name]
        assert isinstance(param, NniParam)
        out[name] = param.decode(params[name])
    return out


def seed_study(
    study: optuna.Study,
    context: Any,
    float_path: Path,
    *,
    pool: InlinePool | ProcessPool,
    log: Callable[[str], None],
    count: Callable[[int, int], None],
) -> SeedGuide:
    """The study's hook: measure (or read back) the sensitivity on the ``pool``'s workers;
    the guide that queues its seeds as the study goes."""
    spec = context.spec
    sensitivity = ensure_sensitivity(
        study,
        spec,
        context.task,
        context.plan,
        float_path,
        float_size_bytes=context.float_size_bytes,
        log=log,
        count=count,
        pool=pool,
    )
    return SeedGuide.of(spec, context.plan, sensitivity)
