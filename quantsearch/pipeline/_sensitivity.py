"""The sensitivity record: what a study measured per layer and bit width on its float model.

Version 2 names its quality metric once (``Sensitivity.metric``, with its direction) and
stores its values as ``float_metric`` and ``SensitivityEntry.metric``; version 1 (every study
before tasks beyond classification) called them ``float_accuracy`` and ``accuracy``, and reads
as the metric ``accuracy``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from quantsearch.pipeline._metrics import MetricInfo, metric_info

__all__ = [
    "Bits",
    "ParamSensitivity",
    "Sensitivity",
    "SensitivityEntry",
]

SENSITIVITY_VERSION = 2
FLOAT = "float"

Bits = int | str


class SensitivityEntry(BaseModel):
    """One parameter at one bit width ("float": not quantized), everything else float."""

    model_config = ConfigDict(frozen=True)

    bits: Bits
    loss: float
    metric: float = Field(validation_alias=AliasChoices("metric", "accuracy"))
    """The study's quality metric (``Sensitivity.metric``) at this setting; NaN when none is
    measured. Version 1 stored it as ``accuracy``."""
    size_delta: int
    """Bytes this setting adds to the float model's size (negative: it saves them)."""
    hessian: float | None = None
    """Mean Hessian trace x ||Q(W) - W||^2 (method hessian, weights only)."""


class ParamSensitivity(BaseModel):
    """A per-layer bits parameter: the tensors it sets, and its measured bit widths."""

    model_config = ConfigDict(frozen=True)

    param: str
    tensors: list[str]
    """``<layer>.<quant type>`` of each tensor the parameter's bits apply to."""
    trace: float | None = None
    """Mean Hessian trace of the loss over the parameter's weights (method hessian)."""
    entries: list[SensitivityEntry] = Field(default_factory=list)

    def entry(self, bits: Bits) -> SensitivityEntry | None:
        return next((e for e in self.entries if e.bits == bits), None)


class Sensitivity(BaseModel):
    """What a study measured on its float model; stored as its ``sensitivity`` attribute.

    Written as it goes (after each entry), so a killed pass continues where it stopped.
    """

    model_config = ConfigDict(frozen=True)

    version: int = SENSITIVITY_VERSION
    method: str
    batches: int
    samples: int
    """Validation images each measurement evaluated."""
    float_sha256: str
    float_loss: float
    float_metric: float = Field(validation_alias=AliasChoices("float_metric", "float_accuracy"))
    """The float model's value of ``metric`` (version 1: ``float_accuracy``)."""
    metric: str | None = "accuracy"
    """The quality metric measured beside the loss: ``accuracy`` for a classifier, else the
    space's first objective that is not a cost (size, bitops, latency); None when there is
    none (the entries hold NaN)."""
    direction: Literal["maximize", "minimize"] = "maximize"
    """Which way ``metric`` is better."""
    loss_label: str = "loss"
    """What ``loss`` is: the training loss, or for a task without one (label-free) the
    ``noise-to-signal ratio`` of the outputs against the float model's."""
    float_size_bytes: int
    params: list[ParamSensitivity]
    candidates: dict[str, list[Bits]]
    """Every bit width of each parameter, in the space's order."""
    complete: bool = False
    seconds: float = 0.0

    def param(self, name: str) -> ParamSensitivity:
        return next(p for p in self.params if p.param == name)

    def increase(self, name: str, bits: Bits) -> float:
        """The predicted cost of ``name`` at ``bits``: the loss increase over float (method
        loss, and activations), or the Hessian measure (method hessian, weights)."""
        if bits == FLOAT:
            return 0.0
        entry = self.param(name).entry(bits)
        if entry is None:
            raise KeyError(f"{name} at {bits} bits was not measured")
        if self.method == "hessian" and entry.hessian is not None:
            return entry.hessian
        return entry.loss - self.float_loss

    @property
    def metric_info(self) -> MetricInfo | None:
        """The registered metric of that name (accuracy, agreement, ...: how it is shown),
        else a plain one with the stored direction; None without a metric."""
        return None if self.metric is None else metric_info(self.metric, self.direction)

    @property
    def by_drop(self) -> bool:
        """Whether the tables show each entry's ``drop`` from the float value, or (a float
        value that is not finite: ``sqnr_db`` of the float model against itself) the value."""
        return math.isfinite(self.float_metric)

    @property
    def drop_label(self) -> str:
        """What the tables show: ``accuracy drop``, ``perplexity increase`` (``by_drop``),
        else the metric's name."""
        if self.metric is None:
            return "no metric"
        if not self.by_drop:
            return self.metric
        return f"{self.metric} {'drop' if self.direction == 'maximize' else 'increase'}"

    def shown_change(self, entry: SensitivityEntry) -> float:
        """The value the tables show for ``entry``: its ``drop``, else (``by_drop`` False) its
        metric."""
        return self.drop(entry) if self.by_drop else entry.metric

    def shown(self, value: float) -> str:
        """A value of the metric as the reports show it (percent for a proportion)."""
        info = self.metric_info
        if info is None:
            return "–"
        return str(value) if math.isinf(value) else info.format(value)

    def drop(self, entry: SensitivityEntry) -> float:
        """How much worse than the float model ``entry``'s metric is (positive: worse)."""
        if self.direction == "maximize":
            return self.float_metric - entry.metric
        return entry.metric - self.float_metric

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per (parameter, bit width): the table the CLI and the report show
        (``metric``: the value of ``self.metric``; ``metric_drop``: ``drop``)."""
        for param in self.params:
            for entry in param.entries:
                yield {
                    "param": param.param,
                    "tensors": ", ".join(param.tensors),
                    "bits": entry.bits,
                    "loss": entry.loss,
                    "loss_increase": entry.loss - self.float_loss,
                    "metric": entry.metric,
                    "metric_drop": self.drop(entry),
                    "metric_shown": self.shown_change(entry),
                    "size_delta": entry.size_delta,
                    "hessian": entry.hessian,
                    "predicted": self.increase(param.param, entry.bits),
                }
