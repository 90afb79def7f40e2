"""report.md is assembled from one ReportData: its sections in a fixed order, each drawn from
the typed study record (target, task, float model, sensitivity)."""

from __future__ import annotations

from pathlib import Path

import optuna

from quantsearch.pipeline import StudyRecord
from quantsearch.report import ReportData, pareto_frame, render_markdown, write_report

from ._studies import LAYERS, build_study

TARGET = {"max_accuracy_drop": 0.01, "float_accuracy": 0.9722, "min_accuracy": 0.9622,
          "smallest_bytes": 6000}
SENSITIVITY = {
    "method": "hessian", "batches": 1, "samples": 64, "float_sha256": "ab", "float_loss": 0.1,
    "float_accuracy": 0.97, "float_size_bytes": 95784, "complete": True, "seconds": 1.5,
    "params": [
        {"param": "conv1.weight_bits", "tensors": ["conv1.weight"], "entries": [
            {"bits": 2, "loss": 0.5, "accuracy": 0.8, "size_delta": -500, "hessian": 1.5},
            {"bits": 8, "loss": 0.11, "accuracy": 0.97, "size_delta": -400, "hessian": 0.01}]},
        {"param": "fc1.weight_bits", "tensors": ["fc1.weight"], "entries": [
            {"bits": 2, "loss": 0.3, "accuracy": 0.9, "size_delta": -70000}]},
    ],
    "candidates": {"conv1.weight_bits": [2, 8, "float"], "fc1.weight_bits": [2, 8, "float"]},
}


def _full_study() -> optuna.Study:
    study = build_study(name="full")
    StudyRecord.write(
        study,
        target=TARGET,
        task={"name": "digits", "seed": 3, "data_dir": "data/x", "options": {"a": 1}},
        float_model={"file": "f.pt", "sha256": "ab", "source": "trained 3 epochs",
                     "val_accuracy": 0.97, "test_accuracy": 0.96, "steps": 3},
        sensitivity=SENSITIVITY,
    )
    return study


def test_the_sections_come_in_order_from_the_record(tmp_path: Path) -> None:
    study = _full_study()
    text = write_report(study, tmp_path / "out").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "# Quantization study `full`",
        "## Target",
        "## Summary",
        "## Validation accuracy against model size",
        "## Pareto front",
        "## Noise on the front",
        "## Bit widths on the front",
        "## Search progress",
        "## Baselines",
        "## Failed trials",
        "## Export a trial",
        "## Sensitivity",
    ]
    assert (tmp_path / "out" / "sensitivity.png").stat().st_size > 0
    # The smallest feasible trial at or above the floor leads the report.
    front = pareto_frame(study)
    fitting = front[front["accuracy"] >= TARGET["min_accuracy"]].sort_values("size_bytes")
    best = fitting.iloc[0]
    assert (
        f"floor 96.22%): **trial {int(best.number)}**, " in text.split("## Summary")[0]
    )
    assert '| task | `digits` (seed `3`, data_dir `data/x`, options `{"a": 1}`) |' in text
    assert "| float model | trained 3 epochs: validation 97.00%, test 96.00% |" in text
    assert "| space hash | `0123abcd` |" in text
    assert (
        "| `conv1.weight_bits` | conv1.weight | +0.4000 / +17.00 / -500 / 1.5 "
        "| +0.0100 / +0.00 / -400 / 0.01 | – |" in text
    )
    assert text.endswith("| `fc1.weight_bits` | fc1.weight | +0.2000 / +7.00 / -70,000 | – | – |\n")


def test_the_report_data_is_what_report_md_shows(tmp_path: Path) -> None:
    study = _full_study()
    data = ReportData.of(study, study_args="--space s.yaml")
    assert data.record.layers == LAYERS
    assert data.record.target is not None and data.record.target.min_accuracy == 0.9622
    assert data.front["number"].tolist() == pareto_frame(study)["number"].tolist()
    assert [axis.name for axis in data.axes] == ["accuracy", "size_bytes"]
    assert data.axes[1].reference == data.float_size_bytes == 95784
    assert data.hypervolume == data.history["hypervolume"].iloc[-1] > 0
    assert [plot.image for plot in data.pareto_plots] == ["pareto.png"]
    written = write_report(study, tmp_path / "out", study_args="--space s.yaml")
    assert render_markdown(data) == written.read_text()
    assert f"| hypervolume | {data.hypervolume:.4f} (of the unit cube" in render_markdown(data)


def test_sections_without_data_are_left_out(tmp_path: Path) -> None:
    study = build_study(name="plain")
    StudyRecord.write(study, sensitivity={**SENSITIVITY, "params": []})
    text = write_report(study, tmp_path / "out").read_text()
    assert "## Target" not in text and "## Sensitivity" not in text
    assert "| float model |" not in text  # no float_model attribute: no row
    assert not (tmp_path / "out" / "sensitivity.png").exists()
    assert text.endswith("All trials with every attribute: [trials.csv](trials.csv).\n")


def test_the_front_shows_each_trials_latency_and_whether_it_runs_on_integer_kernels() -> None:
    from optuna.trial import create_trial

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_metric_names(["accuracy", "size_bytes", "latency"])
    rows = [  # (accuracy, size, latency ms, float ms, integer graph)
        (0.98, 96_000, 20.0, 20.0, None),  # the float model: no integer graph recorded
        (0.975, 24_000, 12.0, 19.8, True),
        (0.96, 14_000, 17.5, 19.9, False),
    ]
    for accuracy, size, latency, reference, integer in rows:
        attrs = {"val_accuracy": accuracy, "test_accuracy": accuracy - 0.004,
                 "size_bytes": size, "float_size_bytes": 96_000,
                 "compression_ratio": 96_000 / size, "algorithm": "qat", "config_list": [],
                 "latency_ms": latency, "latency_float_ms": reference,
                 "latency_speedup": reference / latency}
        if integer is not None:
            attrs["latency_integer"] = integer
        study.add_trial(create_trial(values=[accuracy, float(size), latency], user_attrs=attrs))
    text = render_markdown(ReportData.of(study))
    front = text[text.index("## Pareto front"):]
    assert "| latency | integer kernels |" in front
    assert "| 12 ms (1.65x) | yes |" in front
    assert "| 17.5 ms (1.14x) | no |" in front
    assert "| 20 ms (1.00x) | – |" in front
