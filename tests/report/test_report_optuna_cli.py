"""The study is readable by optuna's own tools (its command line, optuna-dashboard), with its
metric names and attributes."""

from __future__ import annotations

import json
import subprocess
import sys
import wsgiref.util
from pathlib import Path
from typing import Any

import pytest


def _optuna(*args: str) -> str:
    # optuna's console script, run through this interpreter so the same installation answers.
    code = "import sys; from optuna.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return result.stdout


def test_optuna_cli_shows_metric_names_and_attributes(tmp_path: Path, make_study) -> None:
    storage = f"sqlite:///{tmp_path / 'demo.db'}"
    study = make_study(storage, n_random=3, failed=1)
    listed = json.loads(
        _optuna("trials", "--storage", storage, "--study-name", "demo", "-f", "json")
    )
    assert len(listed) == len(study.trials)
    first = listed[0]
    assert first["values"] == {"accuracy": 0.9722, "size_bytes": 95784.0}
    assert first["user_attrs"]["baseline"] == "float"
    assert first["user_attrs"]["test_accuracy"] == study.trials[0].user_attrs["test_accuracy"]
    assert listed[-1]["state"] == "FAIL"

    best = json.loads(
        _optuna("best-trials", "--storage", storage, "--study-name", "demo", "-f", "json")
    )
    assert sorted(t["number"] for t in best) == sorted(t.number for t in study.best_trials)

    studies = json.loads(_optuna("studies", "--storage", storage, "-f", "json"))
    assert studies[0]["name"] == "demo"
    assert studies[0]["user_attrs"]["task"] == "digits"


def test_optuna_dashboard_shows_metric_names_and_attributes(tmp_path: Path, make_study) -> None:
    dashboard = pytest.importorskip("optuna_dashboard")
    storage = f"sqlite:///{tmp_path / 'demo.db'}"
    study = make_study(storage, n_random=3, failed=1)
    app = dashboard.wsgi(storage)

    def get(path: str) -> Any:
        environ: dict[str, Any] = {"PATH_INFO": path}
        wsgiref.util.setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
        assert status == ["200 OK"], body[:200]
        return json.loads(body)

    (summary,) = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == "demo"
    detail = get(f"/api/studies/{summary['study_id']}")
    assert detail["objective_names"] == ["accuracy", "size_bytes"]
    assert len(detail["trials"]) == len(study.trials)
    first = {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}
    assert first["baseline"] == "float"
    assert float(first["test_accuracy"]) == study.trials[0].user_attrs["test_accuracy"]
