"""A task written only from the documentation (dict batches, its own loss and metric) runs every
command: validate, sensitivity, study --jobs 2, report and export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantsearch", *args],
        cwd=folder, env=ENV, capture_output=True, text=True, timeout=600,
    )


def _space(folder: Path) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces" / "regression_diabetes.yaml").read_text())
    space.update(
        task={
            "name": str(ROOT / "examples" / "regression_task.py") + ":make_task",
            "options": {"limit": 150, "hidden": 16},
        },
        train={"epochs": 2, "batch_size": 32, "lr": 0.002},
        float_train={"epochs": 5, "batch_size": 32, "lr": 0.003},
        n_trials=5,
        storage=str(folder / "study.db"),
        sampler={"name": "random"},
        sensitivity={"batches": 2, "seeds": 2},
    )
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_regression_task_with_dict_batches_runs_every_command(tmp_path: Path) -> None:
    space = str(_space(tmp_path))
    validated = _run(tmp_path, "validate", "--space", space)
    assert validated.returncode == 0, validated.stderr
    assert "objectives mae (minimize), size_bytes (minimize)" in validated.stdout
    sensitivity = _run(tmp_path, "sensitivity", "--space", space)
    assert sensitivity.returncode == 0, sensitivity.stderr
    study = _run(tmp_path, "study", "--space", space, "--jobs", "2")
    assert study.returncode == 0, study.stderr
    assert "val_mae" in study.stdout and "target: trial" in study.stdout
    report = _run(tmp_path, "report", "--space", space, "--out", "report")
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| trial | val. mae | test mae |" in text
    assert "percentile-bootstrap interval" in text
    assert "## Mean absolute error (points) against model size" in text
    rows = list(csv.DictReader((tmp_path / "report" / "trials.csv").open()))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == 5 and all(float(r["mae"]) > 0 for r in complete)
    assert all(float(r["mae_low"]) < float(r["mae"]) < float(r["mae_high"]) for r in complete)
    trials = _run(tmp_path, "trials", "--space", space)
    assert trials.returncode == 0 and "val_mae" in trials.stdout
    front = next(r for r in complete if r["pareto"] == "True")
    export = _run(
        tmp_path, "export", "--space", space, "--trial", front["number"], "--out", "exported"
    )
    assert export.returncode == 0, export.stderr
    assert "test mae of the reloaded packed model" in export.stdout and ": equal" in export.stdout
    onnx = _run(
        tmp_path, "export", "--space", space, "--trial", front["number"], "--out", "onnx",
        "--format", "onnx",
    )
    assert onnx.returncode == 0, onnx.stderr
    assert "onnxruntime: test mae " in onnx.stdout and ": agree; onnx.checker passed" in onnx.stdout
    summary = json.loads((tmp_path / "onnx" / "export.json").read_text())["onnx"]
    assert summary["metric"] == "mae" and summary["agrees"] is True
    assert summary["output_difference"]["mean"] <= 0.1 * summary["output_spread"]
