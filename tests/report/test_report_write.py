from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from quantsearch.report import ReportError, pareto_frame, trials_frame, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ["pareto.png", "pareto.svg", "bits.png", "history.png", "trials.csv", "report.md"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture
def sqlite_study(tmp_path: Path, make_study) -> optuna.Study:
    return make_study(f"sqlite:///{tmp_path / 'demo.db'}")


def test_report_writes_valid_images(tmp_path: Path, make_study) -> None:
    report = write_report(make_study(), tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    assert sorted(p.name for p in report.parent.iterdir()) == sorted(FILES)
    for name in ("pareto.png", "bits.png", "history.png"):
        width, height = _png_size(report.parent / name)
        assert width >= 600
        assert height >= 300
    root = ET.parse(report.parent / "pareto.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    svg_text = (report.parent / "pareto.svg").read_text()
    assert "Pareto front" in svg_text  # text is kept as text (svg.fonttype none)
    assert "10 KB" in svg_text


def test_report_files_are_reproducible(tmp_path: Path, make_study) -> None:
    study = make_study()
    first = write_report(study, tmp_path / "a").parent
    second = write_report(study, tmp_path / "b").parent
    for name in ("pareto.svg", "pareto.png", "bits.png", "history.png", "report.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_trials_csv_matches_the_database(tmp_path: Path, sqlite_study: optuna.Study) -> None:
    out = write_report(sqlite_study, tmp_path / "out").parent
    csv = pd.read_csv(out / "trials.csv")
    reloaded = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'demo.db'}")
    trials = reloaded.trials
    assert csv["number"].tolist() == [t.number for t in trials]
    assert csv["state"].tolist() == [t.state.name for t in trials]
    best = {t.number for t in reloaded.best_trials}
    for row, trial in zip(csv.to_dict("records"), trials, strict=True):
        assert row["pareto"] == (trial.number in best)
        if trial.state != TrialState.COMPLETE:
            assert math.isnan(row["accuracy"])
            assert row["fail_reason"] == trial.user_attrs["fail_reason"]
            continue
        attrs = trial.user_attrs
        assert row["accuracy"] == trial.values[0]
        assert row["size_bytes"] == trial.values[1]
        assert row["test_accuracy"] == attrs["test_accuracy"]
        assert row["compression_ratio"] == pytest.approx(attrs["compression_ratio"], rel=1e-15)
        assert row["train_seconds"] == attrs["train_seconds"]
        assert row["checkpoint"] == attrs["checkpoint"]
        assert json.loads(row["config_list"]) == attrs["config_list"]
        assert json.loads(row["constraints"]) == list(trial.constraints.values())
        for layer, per_type in attrs["layer_bits"].items():
            for qtype, bits in per_type.items():
                assert row[f"bits.{layer}.{qtype}"] == bits
    # Same frame whether built from the live study or read back from the CSV.
    live = trials_frame(sqlite_study)
    pd.testing.assert_series_equal(csv["size_bytes"], live["size_bytes"])
    pd.testing.assert_series_equal(csv["accuracy"], live["accuracy"])


def test_report_md_has_the_front_table_plots_and_commands(
    tmp_path: Path, sqlite_study: optuna.Study
) -> None:
    command = "quantsearch report --space search_spaces/digits.yaml"
    report = write_report(
        sqlite_study,
        tmp_path / "out",
        command=command,
        study_args="--space search_spaces/digits.yaml",
    )
    text = report.read_text()
    assert text.startswith("# Quantization study `demo`")
    assert f"```sh\n{command}\n```" in text
    for name in ("pareto.png", "bits.png", "history.png", "pareto.svg", "trials.csv"):
        assert f"]({name})" in text
    front = pareto_frame(sqlite_study)
    table = text.split("## Pareto front", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(front)  # header + one row per front trial
    for line, trial in zip(rows[1:], front.itertuples(), strict=True):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == str(trial.number)
        assert cells[1] == f"{trial.accuracy:.2%}"
        assert cells[4] == f"{int(trial.size_bytes):,}"
        assert json.loads(cells[-1].strip("`")) == json.loads(trial.config_list)
    smallest = int(front["number"].iloc[0])
    assert (
        f"quantsearch export --space search_spaces/digits.yaml --trial {smallest} "
        f"--out exports/trial_{smallest}" in text
    )
    assert (
        f"quantsearch export --space search_spaces/digits.yaml --trial {smallest} "
        f"--out exports/trial_{smallest} --format onnx\n```" in text
    )
    assert "| 27 | DivergedError: loss became nan at epoch 2, step 17 |" in text
    assert "| trials | 29 (27 complete, 2 failed) |" in text


def test_default_commands_name_the_storage(tmp_path: Path, sqlite_study: optuna.Study) -> None:
    text = write_report(sqlite_study, tmp_path / "out").read_text()
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert f"quantsearch report --storage {url} --study demo" in text
    assert f"quantsearch export --storage {url} --study demo --trial" in text


def test_empty_study_is_a_clear_error(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="fresh", directions=["maximize", "minimize"])
    with pytest.raises(ReportError, match=r"study 'fresh' has no trial yet: run `quantsearch"):
        write_report(study, tmp_path / "out", study_args="--space s.yaml")
    assert not (tmp_path / "out").exists()


def test_all_failed_study_is_a_clear_error(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="broken", directions=["maximize", "minimize"])
    for reason in ("TaskError: no mnist files in data/", "other"):
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": reason}))
    with pytest.raises(ReportError) as raised:
        write_report(study, tmp_path / "out", study_args="--space s.yaml")
    message = str(raised.value)
    assert message == (
        "study 'broken' has no completed trial yet (2 fail); first failure: "
        "TaskError: no mnist files in data/: fix the failure or run "
        "`quantsearch study --space s.yaml` first"
    )


def test_study_without_baselines_or_constraints(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="bare", directions=["maximize", "minimize"])
    study.add_trial(create_trial(values=[0.5, 2_000.0]))
    study.add_trial(create_trial(values=[0.7, 30_000.0], user_attrs={"float_size_bytes": 40_000}))
    report = write_report(study, tmp_path / "out")
    assert "| front | 2 trials |" in report.read_text()
    assert _png_size(report.parent / "pareto.png")[0] > 0


def test_all_infeasible_study_reports_an_empty_front(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="tight", directions=["maximize", "minimize"])
    for accuracy, size in ((0.5, 2_000.0), (0.7, 30_000.0)):
        study.add_trial(create_trial(values=[accuracy, size], system_attrs={"constraints": [0.2]}))
    report = write_report(study, tmp_path / "out")
    text = report.read_text()
    assert "| front | empty: no complete trial meets the constraints |" in text
    assert "--trial 0 --out exports/trial_0" in text
    assert not pareto_frame(study).shape[0]


def test_a_three_objective_study_gets_a_plot_per_pair_and_a_bitops_column(
    tmp_path: Path,
) -> None:
    from quantsearch.search import load_space, prepare, run_study
    from tests.search._spaces import write_space

    space = write_space(tmp_path, n_trials=4, objectives=["accuracy", "size_bytes", "bitops"])
    study = run_study(prepare(load_space(space)))
    report = write_report(study, tmp_path / "report")
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == [
        "bits.png",
        "history.png",
        "pareto.png",
        "pareto.svg",
        "pareto_accuracy_bitops.png",
        "pareto_size_bytes_bitops.png",
        "report.md",
        "trials.csv",
    ]
    text = report.read_text()
    assert "| objectives | maximize `accuracy`, minimize `size_bytes`, minimize `bitops` |" in text
    assert "| trial | val. accuracy | test accuracy | size | bytes | compression | bitops |" in text
    assert "of the unit cube of 1 - accuracy, size_bytes / float, bitops / float" in text
    frame = pd.read_csv(tmp_path / "report" / "trials.csv")
    complete = frame[frame["state"] == "COMPLETE"]
    assert (complete["bitops"] <= complete["float_bitops"]).all()
    assert complete["val_samples"].nunique() == 1
