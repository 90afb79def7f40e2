"""A study written by quantsearch 0.1.0 (tests/data/legacy_study, before the study record and
the study location existed) resumes, reports and exports with this version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest

from quantsearch.cli import main
from quantsearch.pipeline import StudyRecord, TrialRecord
from quantsearch.search import load_space, load_study

LEGACY = Path(__file__).parent / "data" / "legacy_study"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    folder = tmp_path / "legacy"
    shutil.copytree(LEGACY, folder)
    return folder / "space.yaml"


def _study(space: Path) -> optuna.Study:
    return load_study(load_space(space))


def test_its_record_reads_every_field_it_wrote(legacy: Path) -> None:
    record = StudyRecord.of(_study(legacy))
    assert record.record_version == 1  # written before records had versions
    assert record.algorithm == "ptq"
    assert record.layers == ["conv1", "conv2", "fc1", "fc2"]
    assert record.float_model is not None
    assert record.float_model.file == "legacy_artifacts/legacy-ptq/float_model.pt"
    assert record.target is not None and record.target.max_accuracy_drop == 0.05
    assert record.sensitivity is not None
    assert [p.param for p in record.sensitivity.params] == [
        "conv1.weight_bits", "conv2.weight_bits", "fc1.weight_bits", "fc2.weight_bits",
    ]  # fmt: skip
    assert record.task_settings()[0] == "digits"
    # Stored as accuracy and float_accuracy (version 1): read as the metric accuracy.
    sensitivity = record.sensitivity
    assert sensitivity.version == 1 and sensitivity.metric == "accuracy"
    assert 0.5 < sensitivity.float_metric <= 1.0
    assert all(0.0 <= e.metric <= 1.0 for p in sensitivity.params for e in p.entries)


def test_it_resumes_reports_and_exports(
    legacy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = [(t.number, t.values) for t in _study(legacy).trials]
    assert len(before) == 4
    text = legacy.read_text().replace("n_trials: 4", "n_trials: 6")
    legacy.write_text(text)

    report_dir = tmp_path / "report"
    assert main(["study", "--space", str(legacy), "--report-dir", str(report_dir)]) == 0
    study = _study(legacy)
    out = capsys.readouterr().out
    assert "resuming: 4 of 6 trials done, front of 2" in out
    # The stored target stops the study at the first trial as small as the space allows.
    assert len(study.trials) == 5
    assert "target: trial 4 is within 5.00% of the float accuracy" in out
    # The old trials are untouched and the float model was reused (its hash matched).
    assert [(t.number, t.values) for t in study.trials[:4]] == before
    assert "float model:" not in out
    report = (report_dir / "report.md").read_text()
    assert "legacy-ptq" in report and "Target" in report

    stored = TrialRecord.of(study.trials[2]).test_accuracy
    folder = tmp_path / "export"
    assert main(["export", "--space", str(legacy), "--trial", "2", "--out", str(folder)]) == 0
    exported = json.loads((folder / "export.json").read_text())
    assert exported["reloaded_accuracy"] == pytest.approx(stored)
