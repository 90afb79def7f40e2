"""The study record: the one schema of the facts a study stores about itself.

The study writes it (creation, float model, target, sensitivity, latency table); the report,
the export, the tables and the CLI read it. Each field is one Optuna study user attribute of
the same name, so ``optuna`` and optuna-dashboard show them; nothing else spells those keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field

from quantsearch.pipeline._float import FloatModel
from quantsearch.pipeline._latency_table import LatencyTable
from quantsearch.pipeline._metrics import MetricInfo, metric_info
from quantsearch.pipeline._record import TrialRecord
from quantsearch.pipeline._sensitivity import Sensitivity

__all__ = ["STUDY_RECORD_VERSION", "StudyRecord", "TargetState", "layer_order"]

#: Raised when a field changes meaning; a study written before versions reads as version 1.
STUDY_RECORD_VERSION = 1


class TargetState(BaseModel):
    """What ``target`` means for one study, once its float model is known: the metric's bound
    and the smallest size any config of the space can reach.

    For ``accuracy`` (``max_accuracy_drop``) the fields say what their names say. For another
    ``metric``, ``float_accuracy`` holds the float model's value of it, ``min_accuracy`` the
    bound a trial must meet (a ceiling when ``direction`` is minimize) and
    ``max_accuracy_drop`` the allowed change in the worse direction (a fraction of the float
    value when ``relative``; NaN for an absolute bound)."""

    model_config = ConfigDict(frozen=True)

    max_accuracy_drop: float
    float_accuracy: float
    min_accuracy: float
    metric: str = "accuracy"
    direction: str = "maximize"
    relative: bool = False
    smallest_bytes: int
    """The smallest model_size_bytes any config of the space gives (every bits parameter at
    its lowest value)."""


class StudyRecord(BaseModel):
    """Everything quantsearch stores about a study as a whole (its trials: TrialRecord).

    A field that is None was not written (yet): ``float_model`` once the float model exists,
    ``target``, ``sensitivity`` and ``latency_table`` only for spaces that ask for them.
    Attributes that are not fields (ones a user added by hand) are ignored when reading.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)
    #: The attribute written last at creation: a study that has it is quantsearch's, complete.
    CREATED_ATTR: ClassVar[str] = "space_hash"

    record_version: int = STUDY_RECORD_VERSION
    space: dict[str, Any] = Field(default_factory=dict)
    """The space the study was created from, as ``SearchSpec.to_dict`` wrote it."""
    space_hash: str | None = None
    task: dict[str, Any] | str | None = None
    """The task's settings (name, data_dir, options, seed); a bare name in early studies."""
    algorithm: str | None = None
    float_size_bytes: int | None = None
    float_bitops: float | None = None
    layers: list[str] = Field(default_factory=list)
    """The model's weighted layers, in model order."""
    float_model: FloatModel | None = None
    artifacts: str | None = None
    """The artifact store (a folder or ``s3://bucket/prefix``) every machine uploads to."""
    target: TargetState | None = None
    sensitivity: Sensitivity | None = None
    latency_table: LatencyTable | None = None
    """The per-layer latency table (a space's ``latency: {table: true}``), measured once."""
    metrics: dict[str, MetricInfo] = Field(default_factory=dict)
    """Every metric the study names (objectives, constraints, target), with its direction,
    label and unit; empty in studies of classifiers written before metrics were general."""

    def metric(self, name: str) -> MetricInfo:
        """What the study stored about metric ``name``, else the registered one, else a
        minimized one by that name."""
        if name in self.metrics:
            return self.metrics[name]
        return metric_info(name, "minimize")

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StudyRecord:
        return cls.model_validate({"record_version": 1, **attrs})

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        """The record of ``study``, read once from its storage."""
        return cls.from_attrs(study.user_attrs)

    @property
    def created(self) -> bool:
        """Whether quantsearch finished writing the study's creation attributes."""
        return getattr(self, self.CREATED_ATTR) is not None

    @staticmethod
    def write(study: optuna.Study, **fields: Any) -> None:
        """Store the given fields in their order (validated first: a bad value writes
        nothing)."""
        dumped = StudyRecord.model_validate(fields).model_dump(include=set(fields), mode="json")
        for key in fields:
            study.set_user_attr(key, dumped[key])

    def task_settings(self) -> tuple[str | None, dict[str, Any]]:
        """The task's name and its settings, from the task attribute or else the space."""
        space_task = self.space.get("task")
        if isinstance(self.task, Mapping):
            return self.task.get("name"), dict(self.task)
        name = self.task
        settings = dict(space_task) if isinstance(space_task, Mapping) else {}
        if name is None and isinstance(space_task, str):
            name = space_task
        return name, settings


def layer_order(study_layers: Sequence[str] | None, trials: Iterable[FrozenTrial]) -> list[str]:
    """Layers in model order (the study's ``layers``), then any others as first seen."""
    order: list[str] = list(study_layers or [])
    seen = set(order)
    for trial in trials:
        for layer in TrialRecord.of(trial).layer_bits:
            if layer not in seen:
                seen.add(layer)
                order.append(layer)
    return order
