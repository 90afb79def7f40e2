"""A space's metrics laid onto its task: each name resolved to its direction, label and unit,
and what the task must offer for the space's trials (a loss to train, labels for accuracy)."""

from __future__ import annotations

from quantsearch.pipeline import FIDELITY_METRICS, METRICS, MetricInfo
from quantsearch.quantization import algorithm_rules
from quantsearch.search._errors import SpaceError
from quantsearch.search._spec import SearchSpec
from quantsearch.tasks import Task

__all__ = ["check_task_fits", "resolve_metrics"]


def _key(spec: SearchSpec, name: str) -> str:
    if name in spec.objectives:
        return f"objectives[{spec.objectives.index(name)}]"
    if spec.target is not None and spec.target.metric == name:
        return "target.metric"
    return "constraints"


def resolve_metrics(spec: SearchSpec, task: Task) -> dict[str, MetricInfo]:
    """Each metric the space names, as the task (or the space, or the registry) declares it.

    A registered metric (accuracy, size_bytes, bitops, the fidelity ones) keeps its own
    direction; a task's metric takes the direction its TaskMetric declares, or the space's
    ``{name, direction}`` when the task declares none. SpaceError names the first that is
    neither, or one whose declarations disagree."""
    declared = {m.name: m for m in task.task_metrics}
    out: dict[str, MetricInfo] = {}
    for name in spec.metric_names:
        given = spec.metrics.get(name, {})
        key = _key(spec, name)
        task_metric = declared.get(name)
        if name in METRICS and task_metric is None:
            if name == "accuracy" and not task.is_classifier:
                raise SpaceError(
                    f"'accuracy': task {task.name!r} reports no accuracy (it reports: "
                    f"{', '.join(declared) or 'nothing'}); name one of its metrics",
                    key=key,
                    source=spec.source,
                )
            if name in FIDELITY_METRICS and spec.from_scratch:
                raise SpaceError(
                    f"{name!r} compares with the float model, which from_scratch trials do "
                    "not use",
                    key=key,
                    source=spec.source,
                )
            out[name] = METRICS[name].info
            continue
        if task_metric is not None:
            if given.get("direction", task_metric.direction) != task_metric.direction:
                raise SpaceError(
                    f"{name} is {task_metric.direction}d by task {task.name!r}, not "
                    f"{given['direction']}d",
                    key=key,
                    source=spec.source,
                )
            out[name] = MetricInfo(
                name=name,
                direction=task_metric.direction,
                label=given.get("label") or task_metric.label or name,
                unit=given.get("unit", task_metric.unit),
                proportion=task_metric.proportion,
                bounds=task_metric.bounds,
            )
            continue
        if given and not declared:
            out[name] = MetricInfo(
                name=name,
                direction=given["direction"],
                label=given.get("label") or name,
                unit=given.get("unit", ""),
            )
            continue
        known = [*declared, *METRICS]
        raise SpaceError(
            f"{name!r} is not a metric of task {task.name!r}; known metrics: "
            f"{', '.join(known)}"
            + ("" if declared or given else " (declare a metric of the task's evaluate as "
               "{name: ..., direction: maximize|minimize} in objectives)"),
            key=key,
            source=spec.source,
        )
    return out


def check_task_fits(spec: SearchSpec, task: Task) -> None:
    """SpaceError when the space asks the task for what it cannot do: train without a loss,
    stop hopeless trials without classes."""
    trains = algorithm_rules(spec.algorithm).trains or spec.from_scratch
    if not task.trains and trains:
        raise SpaceError(
            f"the {spec.algorithm} trials train, but task {task.name!r} has no loss or "
            "training routine (give Task.loss, or search a post-training algorithm: ptq)",
            key="algorithm",
            source=spec.source,
        )
    pretrained = spec.task.pretrained is not None or task.pretrained is not None
    if not task.trains and not pretrained:
        raise SpaceError(
            f"task {task.name!r} cannot train its float model (no loss): give trained "
            "weights as task.pretrained",
            key="task",
            source=spec.source,
        )
    if spec.hopeless is not None and not task.is_classifier:
        raise SpaceError(
            "compares the validation accuracy with chance (1 / classes): only for a "
            f"classifier, and task {task.name!r} is not one",
            key="hopeless",
            source=spec.source,
        )
