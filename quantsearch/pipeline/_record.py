"""The trial record: the one schema that the study writes and every reader reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RECORD_VERSION", "TrialMode", "TrialRecord"]

#: Raised when a field changes meaning; readers accept every version up to this one.
RECORD_VERSION = 2

#: How a trial got its weights: fine-tuned from the float model, calibrated only (ptq),
#: trained from a fresh initialisation, or the float model itself (no quantization).
TrialMode = Literal["finetune", "ptq", "scratch", "float"]


_METRIC_FIELDS = ("metrics", "test_metrics", "intervals", "test_intervals")


class TrialRecord(BaseModel):
    """Everything quantsearch stores about one trial, as Optuna user attributes.

    Each field is one user attribute of the same name (so optuna's CLI and optuna-dashboard
    show them); a field that is None is not stored. Attributes that are not fields (ones a
    user added by hand) are ignored when reading.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    record_version: int = RECORD_VERSION
    algorithm: str | None = None
    mode: TrialMode | None = None
    config_list: list[dict[str, Any]] | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    """Training settings the space searches (lr, ...), as this trial took them."""
    seed: int | None = None
    baseline: str | None = None
    retry_of: int | None = None
    duplicate_of: int | None = None
    seed_of: str | None = None
    """Where a queued trial's parameters came from: ``sensitivity`` for the predicted front."""
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    val_samples: int | None = None
    test_samples: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    """Every metric measured on the validation split, by name: the task's (``accuracy`` for a
    classifier, as ``val_accuracy``) and the fidelity metrics the space names."""
    test_metrics: dict[str, float] = Field(default_factory=dict)
    """The same metrics on the test split."""
    intervals: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """95% intervals of the validation metrics that have one: Wilson for proportions,
    percentile bootstrap from per-example values otherwise (MetricInfo says which)."""
    test_intervals: dict[str, tuple[float, float]] = Field(default_factory=dict)
    size_bytes: int | None = None
    float_size_bytes: int | None = None
    compression_ratio: float | None = None
    bitops: float | None = None
    """Sum over conv/linear layers of MACs x weight bits x activation bits."""
    float_bitops: float | None = None
    layer_bits: dict[str, dict[str, int]] = Field(default_factory=dict)
    latency_ms: float | None = None
    """Median milliseconds per batch of the trial's ONNX export in onnxruntime (the space's
    ``latency`` setup), measured where the trial ran."""
    latency_spread_ms: float | None = None
    """The interquartile range of the timed runs."""
    latency_repeats: int | None = None
    latency_setup: dict[str, Any] | None = None
    """Batch size, threads, provider, repeats and warm-up runs of the measurement."""
    latency_integer: bool | None = None
    """Whether every compute op of the export ran on onnxruntime's integer kernels."""
    latency_float_ms: float | None = None
    """The float model's median, timed in the same loop as the trial's (in turn)."""
    latency_speedup: float | None = None
    """latency_float_ms / latency_ms: above 1 the trial's model is faster than float."""
    latency_predicted_ms: float | None = None
    """The latency predicted from the study's per-layer latency table (``latency: {table:
    true}``): the float model's time plus each quantized layer's change alone."""
    train_seconds: float | None = None
    steps: int | None = None
    """Optimizer steps the trial trained (0 for ptq and float trials)."""
    checkpoint: str | None = None
    checkpoint_artifact: str | None = None
    """The checkpoint's artifact id in the study's artifact store, when it has one."""
    checkpoint_sha256: str | None = None
    fail_reason: str | None = None
    fail_detail: str | None = None

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        # A study written before records had versions holds version 1's fields.
        return cls.model_validate({"record_version": 1, **attrs})

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        return cls.from_attrs(trial.user_attrs)

    def to_attrs(self) -> dict[str, Any]:
        """The user attributes to store: every field that is set (empty metric mappings are
        left out, so a classifier's trials store what they stored before)."""
        empty = {k for k in _METRIC_FIELDS if not getattr(self, k)}
        return self.model_dump(exclude_none=True, exclude=empty)

    def metric(self, name: str, split: str = "val") -> float | None:
        """A metric's value on ``split`` ("val" or "test"): from ``metrics``, else a
        classifier's ``val_accuracy``/``test_accuracy``."""
        values = self.metrics if split == "val" else self.test_metrics
        if name in values:
            return values[name]
        if name == "accuracy":
            return self.val_accuracy if split == "val" else self.test_accuracy
        return None

    def reused_by(self, **changes: Any) -> TrialRecord:
        """This trial's result as another trial that reuses it (a duplicate of it)."""
        # Where the reusing trial came from is its own (seed_of stays as it was queued).
        keep = self.model_dump(exclude={"baseline", "retry_of", "seed", "duplicate_of", "seed_of"})
        return TrialRecord.model_validate({**keep, **changes})
