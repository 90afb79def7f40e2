"""``target``: the smallest model within a bound of the float model's metric.

``{max_accuracy_drop: d}``: once the float model's validation accuracy is known, trials below
``float - d`` become infeasible (an Optuna constraint, as ``constraints.min_accuracy``).
``{metric: m, max_drop: d}`` / ``{metric: m, max_relative_drop: r}`` / ``{metric: m, bound: v}``
do the same for any metric in its worse direction (``min_m`` or ``max_m``). The study stops as
soon as a feasible trial is as small as any config of the space can be.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from quantsearch.pipeline import (
    FloatModel,
    StudyRecord,
    TargetState,
    TrialRecord,
    build_compressed,
)
from quantsearch.quantization import model_size_bytes
from quantsearch.search._config_builder import FLOAT, SpacePlan
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._spec import BITS_PARAMS
from quantsearch.tasks import Task

__all__ = [
    "apply_target",
    "best_within",
    "constraint_values",
    "meets",
    "reached",
    "smallest_size",
    "target_state",
    "target_words",
]

# Global config keys whose values change a model's size (per-channel scales).
_SIZED_KEYS = ("quant_scheme", "quant_dtype")


def smallest_size(task: Task, algorithm: str, plan: SpacePlan) -> int:
    """The size of the space's smallest config: every bits parameter at its fewest bits."""
    values: dict[str, Any] = {}
    choices: dict[str, list[Any]] = {}
    for name, param in plan.params.items():
        if not isinstance(param, NniParam):
            values[name] = param
        elif name.rpartition(".")[2] in BITS_PARAMS:
            bits = [c for c in param.candidates() if c != FLOAT]
            values[name] = min(bits) if bits else FLOAT
        else:
            values[name] = param.candidates()[0]
            if name in _SIZED_KEYS:
                choices[name] = param.candidates()
    sizes = []
    for combo in itertools.product(*choices.values()):
        point = {**values, **dict(zip(choices, combo, strict=True))}
        model = build_compressed(task, algorithm, plan.config_list(point)).model
        sizes.append(model_size_bytes(model))
    return min(sizes)


def _float_value(float_model: FloatModel, metric: str) -> float:
    value = float_model.metric(metric)
    if value is None or not math.isfinite(value):
        raise ValueError(
            f"the target is measured from the float model's {metric}, which it did not report"
        )
    return float(value)


def target_state(
    spec: Any, float_model: FloatModel, smallest_bytes: int, direction: str = "maximize"
) -> TargetState:
    """What the space's target means once the float model is known (see TargetState);
    ``direction``: the target metric's."""
    target = spec.target
    assert target is not None
    if target.metric == "accuracy" and target.bound is None and not target.relative:
        floor = float_model.val_accuracy - target.max_accuracy_drop
        given = spec.constraints.min_accuracy
        return TargetState(
            max_accuracy_drop=target.max_accuracy_drop,
            float_accuracy=float_model.val_accuracy,
            min_accuracy=floor if given is None else max(floor, given),
            smallest_bytes=smallest_bytes,
        )
    sign = 1.0 if direction == "maximize" else -1.0
    if target.bound is not None:
        float_value = float_model.metric(target.metric)
        bound = target.bound
    else:
        float_value = _float_value(float_model, target.metric)
        change = target.max_accuracy_drop * (abs(float_value) if target.relative else 1.0)
        bound = float_value - sign * change
    # The stricter of the target's bound and a constraint on the same metric.
    for kind, metric, value in spec.constraints.bounds:
        if metric == target.metric and (kind == "min") == (sign > 0):
            bound = max(bound, value) if sign > 0 else min(bound, value)
    return TargetState(
        max_accuracy_drop=target.max_accuracy_drop,
        float_accuracy=math.nan if float_value is None else float(float_value),
        min_accuracy=bound,
        smallest_bytes=smallest_bytes,
        metric=target.metric,
        direction=direction,
        relative=target.relative,
    )


def apply_target(
    study: optuna.Study, context: Any, float_model: FloatModel
) -> tuple[Any, TargetState]:
    """The context with the target's bound as a constraint (``constraints.min_accuracy`` for
    accuracy, ``min_<metric>``/``max_<metric>`` otherwise; the stricter when both are given);
    the state is stored in the study."""
    spec = context.spec
    assert spec.target is not None
    info = context.metrics.get(spec.target.metric)
    state = target_state(
        spec,
        float_model,
        smallest_size(context.task, spec.algorithm, context.plan),
        "maximize" if info is None else info.direction,
    )
    StudyRecord.write(study, target=state)
    if state.metric == "accuracy":
        constraints = replace(spec.constraints, min_accuracy=state.min_accuracy)
    else:
        kind = "min" if state.direction == "maximize" else "max"
        kept = tuple(b for b in spec.constraints.bounds if b[:2] != (kind, state.metric))
        constraints = replace(
            spec.constraints, bounds=(*kept, (kind, state.metric, state.min_accuracy))
        )
    return replace(context, spec=replace(spec, constraints=constraints)), state


def constraint_values(constraints: Any, record: TrialRecord) -> dict[str, float]:
    """Each constraint's value for a complete trial (<= 0: met), by its space key."""
    out: dict[str, float] = {}
    accuracy, size = record.val_accuracy, record.size_bytes
    if constraints.min_accuracy is not None and accuracy is not None:
        out["min_accuracy"] = constraints.min_accuracy - accuracy
    if constraints.max_size_bytes is not None and size is not None:
        out["max_size_bytes"] = size - constraints.max_size_bytes
    for kind, metric, bound in constraints.bounds:
        value = _value(record, metric)
        if value is None:
            continue
        # A NaN or an infinitely bad value (a broken trial) breaks every bound on it; an
        # infinitely good one (sqnr_db of outputs equal to the float model's) meets it.
        gap = (bound - value) if kind == "min" else (value - bound)
        out[f"{kind}_{metric}"] = gap if gap == -math.inf or math.isfinite(gap) else math.inf
    return out


def _value(record: TrialRecord, metric: str) -> float | None:
    if metric == "size_bytes":
        return None if record.size_bytes is None else float(record.size_bytes)
    if metric == "bitops":
        return record.bitops
    return record.metric(metric)


def meets(state: TargetState, value: float | None) -> bool:
    """Whether a trial's value of the target's metric is within its bound."""
    if value is None or math.isnan(value):
        return False
    return value >= state.min_accuracy if state.direction == "maximize" else (
        value <= state.min_accuracy
    )


def target_words(state: TargetState) -> str:
    """``is within 1.00% of the float accuracy``, or ``keeps perplexity <= 5.1``."""
    if state.metric == "accuracy":
        return f"is within {state.max_accuracy_drop:.2%} of the float accuracy"
    sign = ">=" if state.direction == "maximize" else "<="
    return f"keeps {state.metric} {sign} {state.min_accuracy:.4g}"


def best_within(
    trials: Sequence[FrozenTrial], min_accuracy: float | TargetState
) -> FrozenTrial | None:
    """The smallest complete trial within the target (a TargetState, or an accuracy floor),
    the better of equals."""
    state = (
        min_accuracy
        if isinstance(min_accuracy, TargetState)
        else TargetState(
            max_accuracy_drop=math.nan, float_accuracy=math.nan, min_accuracy=min_accuracy,
            smallest_bytes=0,
        )
    )
    sign = 1.0 if state.direction == "maximize" else -1.0
    fitting = [
        (t, record)
        for t in trials
        if t.state == TrialState.COMPLETE
        and meets(state, (record := TrialRecord.of(t)).metric(state.metric))
        and record.size_bytes is not None
    ]
    if not fitting:
        return None
    return min(
        fitting,
        key=lambda pair: (pair[1].size_bytes, -sign * (pair[1].metric(state.metric) or 0)),
    )[0]


def reached(trials: Sequence[FrozenTrial], state: TargetState) -> FrozenTrial | None:
    """The trial that ends the search: within the target and as small as the space allows."""
    best = best_within(trials, state)
    if best is None or (TrialRecord.of(best).size_bytes or 0) > state.smallest_bytes:
        return None
    return best
