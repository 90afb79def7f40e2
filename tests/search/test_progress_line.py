"""What the study prints about a trial (its progress line, the front and trials tables):
how each metric is shown, latency as one value in ms."""

from __future__ import annotations

import optuna

from quantsearch.pipeline import TrialRecord
from quantsearch.search._display import front_table, trial_line, trials_table
from quantsearch.search._progress import TrialReport


def _line(**fields: object) -> str:
    return trial_line(TrialReport(number=3, state="COMPLETE", record=TrialRecord(**fields)))


def test_accuracy_line_is_unchanged() -> None:
    line = _line(
        val_accuracy=0.9772,
        test_accuracy=0.9764,
        metrics={"accuracy": 0.9772},
        test_metrics={"accuracy": 0.9764},
        size_bytes=243_000,
        compression_ratio=3.99,
        train_seconds=21.5,
    )
    assert line.startswith("trial   3 COMPLETE val 0.9772  test 0.9764  size ")
    assert "ratio  3.99x    21.5 s" in line
    assert "latency" not in line


def test_latency_is_one_value_in_milliseconds_with_its_speedup() -> None:
    line = _line(
        val_accuracy=0.9772,
        test_accuracy=0.9764,
        metrics={"accuracy": 0.9772, "latency": 11.7012},
        test_metrics={"accuracy": 0.9764, "latency": 11.7012},
        size_bytes=243_000,
        compression_ratio=3.99,
        latency_ms=11.7012,
        latency_float_ms=19.42,
        latency_speedup=19.42 / 11.7012,
        train_seconds=21.5,
    )
    assert "val 0.9772  test 0.9764  size" in line
    assert "ratio  3.99x  latency 11.70 ms (1.66x float)    21.5 s" in line
    assert "val latency" not in line and "test latency" not in line


def test_predicted_latency_says_so() -> None:
    measured_and_predicted = _line(
        val_accuracy=0.98,
        test_accuracy=0.97,
        metrics={"accuracy": 0.98, "latency": 12.0},
        latency_ms=12.0,
        latency_speedup=1.5,
        latency_predicted_ms=12.5,
    )
    assert "latency 12.00 ms (1.50x float; predicted 12.50)" in measured_and_predicted
    only_predicted = _line(
        val_accuracy=0.98,
        test_accuracy=0.97,
        metrics={"accuracy": 0.98, "latency": 12.5},
        latency_predicted_ms=12.5,
    )
    assert "latency 12.50 ms (predicted)" in only_predicted


def test_task_metrics_keep_val_and_test_beside_latency() -> None:
    line = _line(
        metrics={"mse": 0.25, "latency": 3.0},
        test_metrics={"mse": 0.5, "latency": 3.0},
        latency_ms=3.0,
    )
    assert line.startswith("trial   3 COMPLETE val mse 0.25  test mse 0.5  size ")
    assert "latency 3.00 ms" in line
    assert "val latency" not in line
    only_latency = _line(metrics={"latency": 3.0}, latency_ms=3.0)
    assert only_latency.startswith("trial   3 COMPLETE size ")


def _study_with(*records: TrialRecord, values: list[float]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_metric_names(["accuracy", "size_bytes", "latency"])
    for index, record in enumerate(records):
        study.add_trial(
            optuna.trial.create_trial(
                values=[record.val_accuracy or 0.0, float(record.size_bytes or 0), values[index]],
                user_attrs=record.to_attrs(),
            )
        )
    return study


def test_tables_show_latency_once_in_milliseconds_with_the_speedup() -> None:
    def record(accuracy: float, size: int, latency: float, speedup: float) -> TrialRecord:
        return TrialRecord(
            val_accuracy=accuracy,
            test_accuracy=accuracy,
            metrics={"accuracy": accuracy, "latency": latency},
            test_metrics={"accuracy": accuracy, "latency": latency},
            size_bytes=size,
            compression_ratio=970_000 / size,
            latency_ms=latency,
            latency_speedup=speedup,
            train_seconds=20.0,
        )

    study = _study_with(
        record(0.9647, 970_000, 19.8, 0.99),
        record(0.9772, 243_000, 11.7012, 1.66),
        values=[19.8, 11.7012],
    )
    for frame in (front_table(study), trials_table(study)):
        assert "latency_ms" in frame.columns and "speedup" in frame.columns
        assert not {"val_latency", "test_latency"} & set(frame.columns)
        row = frame[frame["trial"] == 1].iloc[0]
        assert (row["latency_ms"], row["speedup"]) == ("11.70", "1.66x")
    columns = list(trials_table(study).columns)
    assert columns.index("ratio") < columns.index("latency_ms") < columns.index("seconds")
