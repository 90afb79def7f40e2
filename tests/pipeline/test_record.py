"""The trial record: one schema for what the study writes and everything reads."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import create_trial
from pydantic import ValidationError

from quantsearch.pipeline import RECORD_VERSION, TrialRecord


def test_a_record_round_trips_through_optuna_user_attributes() -> None:
    record = TrialRecord(
        algorithm="qat",
        mode="finetune",
        config_list=[{"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_names": ["fc"]}],
        seed=3,
        val_accuracy=0.9,
        test_accuracy=0.8,
        val_samples=270,
        size_bytes=1000,
        layer_bits={"fc": {"weight": 4}},
    )
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(create_trial(values=[0.9, 1000.0], user_attrs=record.to_attrs()))
    stored = study.trials[0].user_attrs
    assert stored["record_version"] == RECORD_VERSION
    assert "duplicate_of" not in stored  # unset fields are not stored
    assert TrialRecord.of(study.trials[0]) == record


def test_attributes_of_an_older_study_read_as_version_1_and_extra_ones_are_ignored() -> None:
    record = TrialRecord.from_attrs({"val_accuracy": 0.5, "size_bytes": 7, "my_note": "x"})
    assert (record.record_version, record.val_accuracy, record.size_bytes) == (1, 0.5, 7)


def test_a_wrongly_typed_attribute_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="size_bytes"):
        TrialRecord.from_attrs({"size_bytes": "big"})
    with pytest.raises(ValidationError, match="mode"):
        TrialRecord.from_attrs({"mode": "guess"})


def test_a_reused_result_keeps_the_measurements_and_takes_the_new_trials_identity() -> None:
    original = TrialRecord(seed=1, baseline="float", val_accuracy=0.9, size_bytes=5, retry_of=2)
    reused = original.reused_by(seed=9, duplicate_of=4, train_seconds=0.0)
    assert (reused.val_accuracy, reused.size_bytes) == (0.9, 5)
    assert (reused.seed, reused.duplicate_of) == (9, 4)
    assert (reused.baseline, reused.retry_of) == (None, None)
