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
    size_bytes: int | None = None
    float_size_bytes: int | None = None
    compression_ratio: float | None = None
    bitops: float | None = None
    """Sum over conv/linear layers of MACs x weight bits x activation bits."""
    float_bitops: float | None = None
    layer_bits: dict[str, dict[str, int]] = Field(default_factory=dict)
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
        """The user attributes to store: every field that is set."""
        return self.model_dump(exclude_none=True)

    def reused_by(self, **changes: Any) -> TrialRecord:
        """This trial's result as another trial that reuses it (a duplicate of it)."""
        # Where the reusing trial came from is its own (seed_of stays as it was queued).
        keep = self.model_dump(exclude={"baseline", "retry_of", "seed", "duplicate_of", "seed_of"})
        return TrialRecord.model_validate({**keep, **changes})
