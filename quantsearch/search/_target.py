"""``target: {max_accuracy_drop: d}``: the smallest model within d of the float accuracy.

Once the float model's validation accuracy is known, trials below ``float - d`` become
infeasible (an Optuna constraint, as ``constraints.min_accuracy``), and the study stops as
soon as a feasible trial is as small as any config of the space can be.
"""

from __future__ import annotations

import itertools
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
    "reached",
    "smallest_size",
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


def apply_target(
    study: optuna.Study, context: Any, float_model: FloatModel
) -> tuple[Any, TargetState]:
    """The context with the target's accuracy floor as ``constraints.min_accuracy`` (the
    stricter of the two when both are given); the state is stored in the study."""
    spec = context.spec
    assert spec.target is not None
    floor = float_model.val_accuracy - spec.target.max_accuracy_drop
    given = spec.constraints.min_accuracy
    state = TargetState(
        max_accuracy_drop=spec.target.max_accuracy_drop,
        float_accuracy=float_model.val_accuracy,
        min_accuracy=floor if given is None else max(floor, given),
        smallest_bytes=smallest_size(context.task, spec.algorithm, context.plan),
    )
    StudyRecord.write(study, target=state)
    constraints = replace(spec.constraints, min_accuracy=state.min_accuracy)
    return replace(context, spec=replace(spec, constraints=constraints)), state


def best_within(trials: Sequence[FrozenTrial], min_accuracy: float) -> FrozenTrial | None:
    """The smallest complete trial at or above ``min_accuracy`` (the more accurate of equals)."""
    fitting = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and (record := TrialRecord.of(t)).val_accuracy is not None
        and record.val_accuracy >= min_accuracy
        and record.size_bytes is not None
    ]
    if not fitting:
        return None
    return min(
        fitting,
        key=lambda t: (TrialRecord.of(t).size_bytes, -(TrialRecord.of(t).val_accuracy or 0)),
    )


def reached(trials: Sequence[FrozenTrial], state: TargetState) -> FrozenTrial | None:
    """The trial that ends the search: within the drop and as small as the space allows."""
    best = best_within(trials, state.min_accuracy)
    if best is None or (TrialRecord.of(best).size_bytes or 0) > state.smallest_bytes:
        return None
    return best
