"""Sensitivity names its metric: a classifier's accuracy, another task's first quality
objective (a fidelity metric for a label-free task), in the stored record, the CLI's tables,
report.md and the seed guide; records written before (``accuracy``) still read."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from quantsearch.cli import main
from quantsearch.pipeline import ParamSensitivity, Sensitivity, SensitivityEntry, TrialRecord
from quantsearch.report import sensitivity_markdown
from quantsearch.search import load_space, load_study

ROOT = Path(__file__).resolve().parents[2]
UNLABELLED = yaml.safe_load((ROOT / "search_spaces" / "unlabelled_digits.yaml").read_text())

# A study's sensitivity as version 1 stored it (quantsearch 0.1.0: tests/data/legacy_study).
VERSION_1 = {
    "version": 1, "method": "loss", "batches": 2, "samples": 128, "float_sha256": "ab",
    "float_loss": 0.1, "float_accuracy": 0.97, "float_size_bytes": 1000,
    "params": [{"param": "fc1.weight_bits", "tensors": ["fc1.weight"], "entries": [
        {"bits": 2, "loss": 0.5, "accuracy": 0.8, "size_delta": -700},
        {"bits": "float", "loss": 0.1, "accuracy": 0.97, "size_delta": 0}]}],
    "candidates": {"fc1.weight_bits": [2, "float"]}, "complete": True, "seconds": 1.0,
}  # fmt: skip


def test_a_version_1_record_reads_as_accuracy_and_writes_the_new_names() -> None:
    sensitivity = Sensitivity.model_validate(VERSION_1)
    assert sensitivity.version == 1
    assert (sensitivity.metric, sensitivity.direction) == ("accuracy", "maximize")
    assert sensitivity.float_metric == 0.97
    entry = sensitivity.param("fc1.weight_bits").entry(2)
    assert entry is not None and entry.metric == 0.8
    assert sensitivity.drop(entry) == pytest.approx(0.17)
    dumped = sensitivity.model_dump(mode="json")
    assert dumped["float_metric"] == 0.97 and "float_accuracy" not in dumped
    assert dumped["params"][0]["entries"][0]["metric"] == 0.8
    assert Sensitivity.model_validate(dumped) == sensitivity
    text = "\n".join(sensitivity_markdown(sensitivity, None))
    assert "float loss 0.1000, accuracy 97.00%" in text
    assert "loss increase / accuracy drop in points / size change" in text
    assert "| +0.4000 / +17.00 / -700 |" in text


def _minimized() -> Sensitivity:
    entries = [
        SensitivityEntry(bits=2, loss=2.5, metric=12.5, size_delta=-700),
        SensitivityEntry(bits=8, loss=2.1, metric=8.2, size_delta=-400),
        SensitivityEntry(bits="float", loss=2.1, metric=8.0, size_delta=0),
    ]
    return Sensitivity(
        method="loss", batches=1, samples=64, float_sha256="x", float_loss=2.1,
        float_metric=8.0, metric="perplexity", direction="minimize", float_size_bytes=1000,
        params=[ParamSensitivity(param="fc.weight_bits", tensors=["fc.weight"], entries=entries)],
        candidates={"fc.weight_bits": [2, 8, "float"]}, complete=True,
    )  # fmt: skip


def test_the_report_names_a_minimized_metric_and_its_increase() -> None:
    sensitivity = _minimized()
    text = "\n".join(sensitivity_markdown(sensitivity, None))
    assert "float loss 2.1000, perplexity 8; " in text
    assert "Each cell: loss increase / perplexity increase / size change in bytes" in text
    assert "| +0.4000 / +4.5 / -700 | +0.0000 / +0.2 / -400 | +0.0000 / +0 / +0 |" in text
    assert "accuracy" not in text
    rows = {row["bits"]: row for row in sensitivity.rows()}
    assert rows[2]["metric"] == 12.5 and rows[2]["metric_drop"] == pytest.approx(4.5)


def _unlabelled_space(tmp_path: Path, **changes: Any) -> Path:
    space = {**UNLABELLED, **changes}
    space["task"] = str(ROOT / "examples" / "unlabelled_task.py") + ":make_task"
    space["storage"] = f"sqlite:///{tmp_path / 'study.db'}"
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def test_a_label_free_task_measures_its_fidelity_objective(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _unlabelled_space(tmp_path)
    assert main(["sensitivity", "--space", str(path)]) == 0
    out = capsys.readouterr().out
    sensitivity = load_study(load_space(path)).user_attrs["sensitivity"]
    stored = Sensitivity.model_validate(sensitivity)
    assert (stored.metric, stored.direction) == ("agreement", "maximize")
    assert stored.loss_label == "noise-to-signal ratio"
    # The float model against itself: no noise, full agreement.
    assert stored.float_loss == 0.0 and stored.float_metric == 1.0
    for param in stored.params:
        two, eight = param.entry(2), param.entry(8)
        assert two is not None and eight is not None
        assert 0.0 <= two.metric <= eight.metric <= 1.0
        assert two.loss > eight.loss > 0.0
    # 4 batches of 64 of the 359 validation images; agreement is a share of them.
    assert stored.samples == 256
    assert all(
        round(e.metric * 256) == pytest.approx(e.metric * 256, abs=1e-9)
        for p in stored.params
        for e in p.entries
    )
    assert "float noise-to-signal ratio 0.0000, agreement 100.00%)" in out
    assert "validation agreement drop:" in out
    assert "validation noise-to-signal ratio increase, each parameter alone" in out
    assert "accuracy" not in out


def test_an_infinite_float_value_shows_the_values_not_the_drop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _unlabelled_space(
        tmp_path, objectives=["sqnr_db", "size_bytes"], target={"metric": "sqnr_db", "bound": 20}
    )
    assert main(["sensitivity", "--space", str(path)]) == 0
    out = capsys.readouterr().out
    stored = Sensitivity.model_validate(load_study(load_space(path)).user_attrs["sensitivity"])
    assert stored.metric == "sqnr_db" and stored.float_metric == math.inf
    assert not stored.by_drop and stored.drop_label == "sqnr_db"
    two = stored.param("fc1.weight_bits").entry(2)
    eight = stored.param("fc1.weight_bits").entry(8)
    assert two is not None and eight is not None
    # Each bit adds about 6 dB: 8 bits are far above 2 bits, both finite.
    assert 20.0 < eight.metric - two.metric < 45.0
    assert "float noise-to-signal ratio 0.0000, sqnr_db inf)" in out
    assert "\nvalidation sqnr_db:\n" in out
    text = "\n".join(sensitivity_markdown(stored, None))
    assert "Each cell: noise-to-signal ratio increase / sqnr_db / size change" in text
    assert f" / {eight.metric:.4g} dB / " in text


def _ask_tell(study: optuna.Study, record: TrialRecord, values: list[float]) -> None:
    trial = study.ask({"x": optuna.distributions.IntDistribution(0, 10)})
    for key, value in record.to_attrs().items():
        trial.set_user_attr(key, value)
    study.tell(trial, values)


def test_the_seed_guide_judges_seeds_by_the_sensitivity_metric() -> None:
    from quantsearch.search._seed_guide import SEED_MARK, SeedGuide

    guide = SeedGuide(configs=(), params=(), patience=2, metric="mae", maximize=False)
    study = optuna.create_study(directions=["minimize", "minimize"])
    # A trial of MAE 40 at 100 bytes; seeds of MAE 45 [44, 46] at 200 bytes miss the front.
    _ask_tell(study, TrialRecord(metrics={"mae": 40.0}, size_bytes=100), [40.0, 100])
    for _ in range(2):
        seed = TrialRecord(
            seed_of=SEED_MARK, metrics={"mae": 45.0}, intervals={"mae": (44.0, 46.0)},
            size_bytes=200,
        )  # fmt: skip
        _ask_tell(study, seed, [45.0, 200])
    trials = study.get_trials()
    records = [TrialRecord.of(t) for t in trials]
    assert guide.misses(trials, records) == 2
    assert guide.ended(trials, records) is not None
    # A seed whose interval reaches below the other trial's MAE is within the noise: no miss.
    close = TrialRecord(
        seed_of=SEED_MARK, metrics={"mae": 41.0}, intervals={"mae": (39.0, 43.0)}, size_bytes=200
    )
    _ask_tell(study, close, [41.0, 200])
    trials = study.get_trials()
    assert guide.misses(trials, [TrialRecord.of(t) for t in trials]) == 0
    # Judged by accuracy (the old rule), the same seeds have no value: each one a miss.
    by_accuracy = dataclasses.replace(guide, metric="accuracy", maximize=True)
    assert by_accuracy.misses(trials, [TrialRecord.of(t) for t in trials]) == 3
