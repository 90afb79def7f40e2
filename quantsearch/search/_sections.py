"""The study-level sections of a space: task, objectives, sampler, constraints, hopeless,
calibration, sensitivity and target, each checked into its part of the SearchSpec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from quantsearch.pipeline import METRICS, LatencySetup
from quantsearch.quantization import algorithm_rules
from quantsearch.search._errors import SpaceError
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._paths import resolve_path
from quantsearch.search._rules import (
    MEASURING_ALGORITHM,
    METRIC_ALIASES,
    OBJECTIVES,
    SEED_SPREADS,
    SENSITIVITY_METHODS,
    is_int,
    is_real,
    mapping,
)
from quantsearch.search._samplers import SAMPLERS
from quantsearch.search._spec import (
    LATENCY_SOURCES,
    Constraints,
    HopelessRule,
    PerLayer,
    SamplerSpec,
    SensitivitySpec,
    Target,
    TaskSpec,
)
from quantsearch.tasks import user_task_file

__all__ = [
    "is_user_task",
    "parse_calibration",
    "parse_constraints",
    "parse_hopeless",
    "parse_latency",
    "parse_latency_options",
    "parse_metrics",
    "parse_objectives",
    "parse_sampler",
    "parse_sensitivity",
    "parse_target",
    "parse_task",
    "task_spec",
]

# The keys of ``sensitivity:``: SensitivitySpec's fields, in its order.
_SENSITIVITY_KEYS = tuple(f.name for f in fields(SensitivitySpec))


def parse_calibration(value: Any) -> int:
    calibration = mapping(value or {}, key="calibration", allowed=("batches",))
    batches = calibration.get("batches", 32)
    if not is_int(batches) or batches < 1:
        raise SpaceError(f"{batches!r} is not an integer >= 1", key="calibration.batches")
    return batches


def parse_sensitivity(
    value: Any, per_layer: PerLayer | None, n_trials: int, from_scratch: bool
) -> SensitivitySpec | None:
    """``sensitivity:`` (``true``: SensitivitySpec's defaults), checked against the space."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    rule = mapping(value, key="sensitivity", allowed=_SENSITIVITY_KEYS)
    if per_layer is None:
        raise SpaceError(
            "measures each per-layer bits parameter, but the space has no per_layer; "
            "add per_layer or drop sensitivity",
            key="sensitivity",
        )
    if from_scratch:
        raise SpaceError(
            "is measured on the trained float model, which from_scratch trials do not "
            "use; drop one of them",
            key="sensitivity",
        )
    if "method" in rule and rule["method"] not in SENSITIVITY_METHODS:
        raise SpaceError(
            f"{rule['method']!r} is not a method; allowed: {', '.join(SENSITIVITY_METHODS)}",
            key="sensitivity.method",
        )
    for key in ("batches", "hessian_samples"):
        if key in rule and (not is_int(rule[key]) or rule[key] < 1):
            raise SpaceError(f"{rule[key]!r} is not an integer >= 1", key=f"sensitivity.{key}")
    if "spread" in rule and rule["spread"] not in SEED_SPREADS:
        raise SpaceError(
            f"{rule['spread']!r} is not a spread; allowed: {', '.join(SEED_SPREADS)}",
            key="sensitivity.spread",
        )
    for key in ("patience", "seeds"):
        count = rule.get(key)
        if key in rule and (key == "patience" or count is not None) and (
            not is_int(count) or count < 0
        ):
            raise SpaceError(f"{count!r} is not an integer >= 0", key=f"sensitivity.{key}")
    seeds = rule.get("seeds")
    if seeds is not None and seeds > n_trials:
        raise SpaceError(
            f"{seeds} seed trials do not fit in n_trials ({n_trials})",
            key="sensitivity.seeds",
        )
    measuring = algorithm_rules(MEASURING_ALGORITHM)
    for name, param in per_layer.params.items():
        values = param.candidates() if isinstance(param, NniParam) else [param]
        low = [v for v in values if is_int(v) and v < measuring.min_bits]
        if low:
            raise SpaceError(
                f"per_layer.{name} offers {low[0]} bit(s); sensitivity measures "
                f"post-training ({MEASURING_ALGORITHM}), which quantizes to "
                f"{measuring.min_bits}..{measuring.max_bits} bits",
                key="sensitivity",
            )
    return SensitivitySpec(**rule)


def parse_target(value: Any, top: Mapping[str, Any]) -> Target | None:
    if value is None:
        return None
    rule = mapping(value, key="target", allowed=_TARGET_KEYS)
    if "metric" in rule or "max_accuracy_drop" not in rule:
        return _metric_target(rule, top)
    drop = rule.get("max_accuracy_drop")
    if not is_real(drop) or not 0 <= drop < 1:
        raise SpaceError(
            f"{drop!r} is not an accuracy drop in [0, 1) (0.01: one point below float)",
            key="target.max_accuracy_drop",
        )
    if top.get("from_scratch") is True:
        raise SpaceError(
            "is measured from the float model's accuracy, which from_scratch trials do not "
            "use; use constraints.min_accuracy instead",
            key="target",
        )
    objectives = parse_objectives(top.get("objectives"), user_task=True)
    if "accuracy" not in objectives or "size_bytes" not in objectives:
        raise SpaceError(
            "asks for the smallest model within an accuracy drop, so objectives must "
            "include accuracy and size_bytes",
            key="target",
        )
    return Target(max_accuracy_drop=float(drop))


_TARGET_KEYS = ("max_accuracy_drop", "metric", "max_drop", "max_relative_drop", "bound")


def _metric_target(rule: Mapping[str, Any], top: Mapping[str, Any]) -> Target:
    """``{metric: m, max_drop: d}``, ``{metric: m, max_relative_drop: r}`` or ``{metric: m,
    bound: v}``: exactly one of the three."""
    metric = rule.get("metric")
    if not isinstance(metric, str) or not metric:
        raise SpaceError(f"{metric!r} is not a metric name", key="target.metric")
    metric = METRIC_ALIASES.get(metric, metric)
    given = [k for k in _TARGET_KEYS if k != "metric" and k in rule]
    if len(given) != 1:
        raise SpaceError(
            "takes one of max_drop (in the metric's units), max_relative_drop (a fraction of "
            "the float model's value) or bound (an absolute floor, or ceiling for a minimized "
            "metric)",
            key="target",
        )
    key = given[0]
    amount = rule[key]
    if not is_real(amount) or (key != "bound" and amount < 0):
        raise SpaceError(f"{amount!r} is not a number >= 0", key=f"target.{key}")
    if key != "bound" and top.get("from_scratch") is True:
        raise SpaceError(
            "is measured from the float model's value, which from_scratch trials do not "
            f"use; use constraints (min_{metric} or max_{metric}) instead",
            key="target",
        )
    objectives = parse_objectives(top.get("objectives"), user_task=True)
    if metric not in objectives or "size_bytes" not in objectives:
        raise SpaceError(
            f"asks for the smallest model that keeps {metric}, so objectives must include "
            f"{metric} and size_bytes",
            key="target",
        )
    if key == "bound":
        return Target(max_accuracy_drop=float("nan"), metric=metric, bound=float(amount))
    return Target(
        max_accuracy_drop=float(amount),
        metric=metric,
        relative=key == "max_relative_drop",
    )


def parse_task(value: Any, base: Path | None) -> TaskSpec:
    """``task:``, a name or a mapping; its paths resolved against ``base`` (see task_spec)."""
    if isinstance(value, str):
        if not value.strip():
            raise SpaceError("is empty; give a task name such as digits", key="task")
        return task_spec(base, name=value)
    task = mapping(value, key="task", allowed=("name", "data_dir", "options", "pretrained"))
    name = task.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SpaceError(f"{name!r} is not a task name such as digits", key="task.name")
    data_dir = task.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise SpaceError(f"{data_dir!r} is not a folder path", key="task.data_dir")
    options = task.get("options", {})
    if not isinstance(options, dict):
        raise SpaceError(f"{options!r} is not a mapping", key="task.options")
    pretrained = task.get("pretrained")
    if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
        raise SpaceError(
            f"{pretrained!r} is not a state-dict file path", key="task.pretrained"
        )
    return task_spec(
        base,
        name=name, data_dir=data_dir, options=dict(options), pretrained=pretrained
    )


def task_spec(
    base: Path | None,
    *,
    name: str,
    data_dir: str | None = None,
    options: dict[str, Any] | None = None,
    pretrained: str | None = None,
) -> TaskSpec:
    """The TaskSpec with its paths resolved; ``written`` keeps the hashed ones as given."""
    written: dict[str, str] = {}
    task_file = user_task_file(name)
    if task_file is not None and base is not None:
        file, rest = task_file
        resolved = resolve_path(file, base) + rest
        if resolved != name:
            written["name"], name = name, resolved
    if data_dir is not None:
        data_dir = resolve_path(data_dir, base)
    if pretrained is not None and resolve_path(pretrained, base) != pretrained:
        written["pretrained"], pretrained = pretrained, resolve_path(pretrained, base)
    return TaskSpec(
        name=name,
        data_dir=data_dir,
        options=dict(options or {}),
        pretrained=pretrained,
        written=written,
    )


def is_user_task(top: Mapping[str, Any]) -> bool:
    """Whether the space's task is the user's (its metrics are known only once it is built)."""
    task = top.get("task", "digits")
    name = task.get("name") if isinstance(task, Mapping) else task
    return isinstance(name, str) and (":" in name or name.strip().endswith(".py"))


def _objective_name(item: Any, index: int) -> Any:
    if isinstance(item, Mapping):
        return item.get("name")
    return item


def parse_objectives(value: Any, *, user_task: bool = False) -> tuple[str, ...]:
    """The objectives' metric names. A name that is not a registered metric is the task's:
    a user task's metrics are checked once it is built (``user_task``); a built-in task (a
    classifier) has only the registered ones."""
    if value is None:
        return OBJECTIVES
    known = ", ".join(METRICS)
    if not isinstance(value, list) or not 2 <= len(value) <= 3:
        raise SpaceError(
            f"{value!r} is not a list of two or three metrics; known metrics: {known}",
            key="objectives",
        )
    names: list[str] = []
    declared = parse_metrics(value)
    for index, item in enumerate(value):
        name = _objective_name(item, index)
        name = METRIC_ALIASES.get(name, name) if isinstance(name, str) else name
        if not isinstance(name, str) or not name or (
            name not in METRICS and not user_task and name not in declared
        ):
            raise SpaceError(
                f"{item!r} is not a metric; known metrics: {known}",
                key=f"objectives[{index}]",
            )
        if name in names:
            raise SpaceError(f"{item!r} is listed twice", key=f"objectives[{index}]")
        names.append(name)
    return tuple(names)


_DECLARATION_KEYS = ("name", "direction", "label", "unit")


def parse_metrics(value: Any) -> dict[str, dict[str, Any]]:
    """The metrics ``objectives`` declares as mappings (``{name: perplexity, direction:
    minimize, unit: ...}``): name -> its direction, label and unit as given."""
    if not isinstance(value, list):
        return {}
    declared: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            continue
        where = f"objectives[{index}]"
        entry = mapping(item, key=where, allowed=_DECLARATION_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SpaceError(f"{name!r} is not a metric name", key=f"{where}.name")
        direction = entry.get("direction")
        if direction not in ("maximize", "minimize"):
            raise SpaceError(
                f"{direction!r} is not a direction; allowed: maximize, minimize",
                key=f"{where}.direction",
            )
        registered = METRICS.get(METRIC_ALIASES.get(name, name))
        if registered is not None and registered.direction != direction:
            raise SpaceError(
                f"{name} is {registered.direction}d, not {direction}d", key=f"{where}.direction"
            )
        for key in ("label", "unit"):
            if key in entry and not isinstance(entry[key], str):
                raise SpaceError(f"{entry[key]!r} is not text", key=f"{where}.{key}")
        declared[name] = {k: entry[k] for k in ("direction", "label", "unit") if k in entry}
    return declared


def parse_sampler(value: Any) -> SamplerSpec:
    if isinstance(value, str):
        value = {"name": value}
    owners: dict[str, list[str]] = {}
    for entry in SAMPLERS.values():
        for option in entry.options:
            owners.setdefault(option, []).append(entry.name)
    sampler = mapping(value or {}, key="sampler", allowed=("name", *owners))
    name = sampler.get("name", "nsga2")
    if name not in SAMPLERS:
        raise SpaceError(
            f"{name!r} is not a sampler; allowed: {', '.join(SAMPLERS)}", key="sampler.name"
        )
    options = {k: v for k, v in sampler.items() if k != "name" and v is not None}
    taken = SAMPLERS[name].options
    for key, given in options.items():
        option = taken.get(key) or SAMPLERS[owners[key][0]].options[key]
        if key not in taken or not option.check(given):
            raise SpaceError(
                f"{given!r}: {key} is {option.rule}, for the {' or '.join(owners[key])} "
                "sampler only",
                key=f"sampler.{key}",
            )
    return SamplerSpec(name=name, options=options)


class _ConstraintKeys(tuple):
    """The keys ``constraints`` takes: its two named ones and any ``min_<m>``/``max_<m>``."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (
            key in _NAMED_CONSTRAINTS or key.startswith(("min_", "max_"))
        )


_NAMED_CONSTRAINTS = ("min_accuracy", "max_size_bytes")


def parse_constraints(value: Any, *, user_task: bool = True) -> Constraints:
    constraints = mapping(
        value or {}, key="constraints", allowed=_ConstraintKeys(_NAMED_CONSTRAINTS)
    )
    min_accuracy = constraints.get("min_accuracy")
    if min_accuracy is not None and not (is_real(min_accuracy) and 0 <= min_accuracy <= 1):
        raise SpaceError(
            f"{min_accuracy!r} is not an accuracy in [0, 1]", key="constraints.min_accuracy"
        )
    max_size = constraints.get("max_size_bytes")
    if max_size is not None and not (is_int(max_size) and max_size > 0):
        raise SpaceError(
            f"{max_size!r} is not a size in bytes (an integer > 0)",
            key="constraints.max_size_bytes",
        )
    bounds: list[tuple[str, str, float]] = []
    for key, bound in constraints.items():
        if key in _NAMED_CONSTRAINTS:
            continue
        kind, _, metric = key.partition("_")
        metric = METRIC_ALIASES.get(metric, metric)
        if not metric or (metric not in METRICS and not user_task):
            raise SpaceError(
                f"{metric!r} is not a metric; known metrics: {', '.join(METRICS)}",
                key=f"constraints.{key}",
            )
        if not is_real(bound):
            raise SpaceError(f"{bound!r} is not a number", key=f"constraints.{key}")
        bounds.append((kind, metric, float(bound)))
    return Constraints(
        min_accuracy=None if min_accuracy is None else float(min_accuracy),
        max_size_bytes=max_size,
        bounds=tuple(bounds),
    )


_LATENCY_KEYS = tuple(f.name for f in fields(LatencySetup))
# The keys of ``latency:`` that are not how one model is timed: the per-layer table.
_LATENCY_OPTIONS = ("table", "source")


def parse_latency(value: Any) -> LatencySetup | None:
    """``latency:`` (``true``: LatencySetup's defaults): how the latency metric is timed."""
    if value is None or value is False:
        return None
    rule = mapping(
        {} if value is True else value, key="latency", allowed=(*_LATENCY_KEYS, *_LATENCY_OPTIONS)
    )
    rule = {k: v for k, v in rule.items() if k not in _LATENCY_OPTIONS}
    for key in ("batch_size", "threads", "repeats"):
        if key in rule and not (is_int(rule[key]) and rule[key] >= 1):
            raise SpaceError(f"{rule[key]!r} is not an integer >= 1", key=f"latency.{key}")
    if "warmup" in rule and not (is_int(rule["warmup"]) and rule["warmup"] >= 0):
        raise SpaceError(f"{rule['warmup']!r} is not an integer >= 0", key="latency.warmup")
    provider = rule.get("provider", LatencySetup.provider)
    if not isinstance(provider, str) or not provider.endswith("ExecutionProvider"):
        raise SpaceError(
            f"{provider!r} is not an onnxruntime execution provider (e.g. "
            "CPUExecutionProvider)",
            key="latency.provider",
        )
    return LatencySetup(**rule)


def parse_latency_options(value: Any) -> dict[str, Any]:
    """The SearchSpec fields of ``latency: {table: true, source: measured | predicted}``:
    whether the per-layer latency table is measured, and what the latency metric is
    (``predicted`` needs the table, and turns it on)."""
    if not isinstance(value, Mapping):
        return {}
    table = value.get("table")
    if "table" in value and not isinstance(table, bool):
        raise SpaceError(
            f"{table!r} is not true or false (true: measure the per-layer latency table once "
            "per study)",
            key="latency.table",
        )
    source = value.get("source", LATENCY_SOURCES[0])
    if source not in LATENCY_SOURCES:
        raise SpaceError(
            f"{source!r} is not a latency source; allowed: {', '.join(LATENCY_SOURCES)} "
            "(measured: each trial's export timed; predicted: from the per-layer table)",
            key="latency.source",
        )
    if source == "predicted" and table is False:
        raise SpaceError(
            "source predicted reads the per-layer latency table, which table: false turns "
            "off; drop table: false (predicted measures the table)",
            key="latency.source",
        )
    return {"latency_table": bool(table) or source == "predicted", "latency_source": source}


def parse_hopeless(value: Any) -> HopelessRule | None:
    if value is None or value is False:
        return None
    rule = mapping(value, key="hopeless", allowed=("after_epoch", "margin"))
    after = rule.get("after_epoch", 1)
    if not is_int(after) or after < 1:
        raise SpaceError(f"{after!r} is not an integer >= 1", key="hopeless.after_epoch")
    margin = rule.get("margin", 0.05)
    if not is_real(margin) or not 0 <= margin < 1:
        raise SpaceError(f"{margin!r} is not a number in [0, 1)", key="hopeless.margin")
    return HopelessRule(after_epoch=after, margin=float(margin))
