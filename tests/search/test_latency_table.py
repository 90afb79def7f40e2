"""The per-layer latency table: the space's options, the table measured once per study (real
timings: only their shape and sign are asserted), the predicted latency of a config, a trial
that uses the prediction as its latency, and the report's comparison with measurement."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from quantsearch.pipeline import LatencyEntry, LatencyTable, StudyRecord, TrialRecord
from quantsearch.report import prediction_error, write_report
from quantsearch.report._latency import latency_prediction_markdown
from quantsearch.search import (
    SpaceError,
    TrialJob,
    _latency_table,
    load_space,
    prepare,
    run_study,
    run_trial,
)
from quantsearch.search._latency_table import (
    ensure_latency_table,
    layer_config_list,
    measure_latency_table,
    table_settings,
)
from quantsearch.search._spec import TaskSpec

SpaceFile = Callable[..., Path]

# The digits CNN's two Linear layers, each at 8 bits or float: a table of two entries.
LINEAR = {
    "params": {},
    "baselines": {"float": True, "uniform_bits": [8]},
    "quantize": {"weight": {"op_types": ["Linear"]}},
    "per_layer": {
        "op_types": ["Linear"],
        "weight_bits": {"_type": "choice", "_value": [8, "float"]},
    },
    "objectives": ["accuracy", "size", "latency"],
    "latency": {"repeats": 3, "warmup": 1, "table": True},
}


def _onnx() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


@pytest.mark.parametrize(
    ("latency", "key", "words"),
    [
        ({"table": "yes"}, "latency.table", "'yes' is not true or false"),
        ({"source": "guessed"}, "latency.source", "allowed: measured, predicted"),
        ({"source": "predicted", "table": False}, "latency.source", "drop table: false"),
        ({"tables": True}, "latency.tables", "unknown key 'tables'"),
    ],
)
def test_the_table_options_are_checked(
    space_file: SpaceFile, latency: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(SpaceError) as caught:
        load_space(space_file(latency=latency))
    assert caught.value.key == key
    assert words in str(caught.value)


def test_a_space_without_the_table_keeps_its_hash(space_file: SpaceFile) -> None:
    plain = load_space(space_file(latency={"repeats": 3}))
    assert not plain.latency_table and plain.latency_source == "measured"
    assert set(plain.to_dict()["latency"]) == {
        "batch_size",
        "threads",
        "provider",
        "repeats",
        "warmup",
    }
    off = load_space(space_file(latency={"repeats": 3, "table": False, "source": "measured"}))
    assert off.space_hash == plain.space_hash
    table = load_space(space_file(latency={"repeats": 3, "table": True}))
    assert table.latency_table and table.to_dict()["latency"]["table"] is True
    assert table.space_hash != plain.space_hash
    # The prediction as the metric needs the table, and turns it on.
    predicted = load_space(space_file(latency={"source": "predicted"}))
    assert predicted.latency_table and predicted.latency_source == "predicted"
    assert predicted.to_dict()["latency"]["source"] == "predicted"


def _table() -> LatencyTable:
    def entry(layer: str, bits: dict[str, int], latency: float, float_ms: float) -> LatencyEntry:
        return LatencyEntry(
            layer=layer, bits=bits, latency_ms=latency, spread_ms=0.1, float_ms=float_ms
        )

    return LatencyTable(
        setup={"batch_size": 1, "threads": 1},
        float_ms=10.0,
        float_spread_ms=0.2,
        settings={
            "conv1": [{"weight": 4}, {"weight": 8}],
            "relu1": [{"output": 8}],
            "fc2": [{"weight": 4}],
        },
        entries=[
            entry("conv1", {"weight": 4}, 9.0, 10.5),  # -1.5 against its own float run
            entry("conv1", {"weight": 8}, 9.5, 10.0),  # -0.5
            entry("relu1", {"output": 8}, 10.75, 10.25),  # +0.5
            entry("fc2", {"weight": 4}, 11.0, 9.0),  # +2.0
        ],
        complete=True,
    )


def test_the_prediction_adds_each_layers_relative_change_to_the_float_time() -> None:
    table = _table()
    assert table.predict({}) == 10.0  # the float model
    assert table.predict({"conv1": {"weight": 8}}) == pytest.approx(9.5)  # 9.5 / 10.0: -5%
    both = {"conv1": {"weight": 4}, "relu1": {"output": 8}, "fc2": {"weight": 4}}
    # Each change relative to the float run timed beside it, at the table's 10 ms: a slower
    # machine during an entry (conv1 at 4 bits: 9.0 against 10.5) does not shift the rest.
    changes = {"conv1": 10 * (9.0 / 10.5 - 1), "relu1": 10 * (10.75 / 10.25 - 1),
               "fc2": 10 * (11.0 / 9.0 - 1)}
    assert table.contributions(both) == pytest.approx(changes)
    assert table.predict(both) == pytest.approx(10.0 + sum(changes.values()))
    assert table.missing == []
    with pytest.raises(KeyError, match=r"fc2 at \{'weight': 8\}"):
        table.predict({"fc2": {"weight": 8}})
    # Stored in the study record, typed, and read back equal.
    record = StudyRecord.from_attrs({"latency_table": table.model_dump(mode="json")})
    assert record.latency_table == table


def test_the_settings_are_each_layer_at_each_bit_width(space_file: SpaceFile) -> None:
    # SMALL_SPACE: each conv/linear weight at 2, 4, 8 bits or float; every ReLU6 output at
    # the searched output_bits (4 or 8).
    context = prepare(load_space(space_file()))
    settings = table_settings(context.plan)
    assert list(settings) == ["conv1", "relu1", "conv2", "relu2", "fc1", "relu3", "fc2"]
    assert settings["conv1"] == [{"weight": 2}, {"weight": 4}, {"weight": 8}]
    assert settings["relu1"] == [{"output": 4}, {"output": 8}]
    config = layer_config_list(context.plan, "relu1", {"output": 8})
    assert config == [
        {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_names": ["relu1"]}
    ]


def test_a_layers_config_keeps_the_keys_that_change_the_graph(space_file: SpaceFile) -> None:
    scheme = {"weight": "per_channel_symmetric", "output": "per_tensor_affine"}
    params = {"output_bits": 8, "quant_scheme": scheme, "rounding": "gptq"}
    context = prepare(load_space(space_file(algorithm="ptq", train=None, params=params)))
    # The scheme (per channel or not) changes the exported graph: kept, cut to the layer's
    # quant types; the rounding changes weight values only: left out.
    assert layer_config_list(context.plan, "conv1", {"weight": 8}) == [
        {"quant_types": ["weight"], "quant_bits": {"weight": 8}, "op_names": ["conv1"],
         "quant_scheme": {"weight": "per_channel_symmetric"}}
    ]


def test_the_table_is_measured_and_a_killed_pass_resumes(
    space_file: SpaceFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    _onnx()
    # One entry (fc2 at 8 bits) keeps this test short: each timed model is an ONNX export.
    fc2 = {"op_names": ["fc2"]}
    spec = load_space(
        space_file(
            **{**LINEAR, "quantize": {"weight": fc2}, "per_layer": {**LINEAR["per_layer"], **fc2}}
        )
    )
    context = prepare(spec)
    saved: list[LatencyTable] = []
    table = measure_latency_table(spec, context.task, context.plan, None, save=saved.append)
    assert table.complete and table.setup["repeats"] == 3
    assert table.settings == {"fc2": [{"weight": 8}]}
    assert table.float_ms > 0 and table.float_spread_ms >= 0
    [entry] = table.entries
    assert (entry.layer, entry.bits) == ("fc2", {"weight": 8})
    assert entry.latency_ms > 0 and entry.float_ms > 0 and entry.spread_ms >= 0
    assert math.isfinite(entry.delta_ms)
    # Saved after the float model and after the entry, then once complete.
    assert [len(t.entries) for t in saved] == [0, 1, 1] and saved[-1].complete
    assert table.predict({"fc2": {"weight": 8}}) == pytest.approx(
        table.float_ms * entry.latency_ms / entry.float_ms
    )
    # Killed before its entry: only the entry is measured again; the float time is kept.
    asked: list[str] = []
    monkeypatch.setattr(
        _latency_table._Measurer, "entry", lambda self, layer, bits: asked.append(layer) or entry
    )
    monkeypatch.setattr(_latency_table._Measurer, "time_float", lambda self: pytest.fail())
    counts: list[tuple[int, int]] = []
    again = measure_latency_table(
        spec,
        context.task,
        context.plan,
        None,
        stored=saved[0],
        count=lambda done, total: counts.append((done, total)),
    )
    assert asked == ["fc2"] and counts == [(0, 1), (1, 1)]
    assert again.float_ms == table.float_ms and again.entries == [entry] and again.complete


def test_a_trial_can_take_the_predicted_latency_without_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import quantsearch.pipeline

    def no_timing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a predicted latency exports and times nothing")

    monkeypatch.setattr(quantsearch.pipeline, "measure_latency", no_timing)
    table = _table()
    job = TrialJob(
        number=0,
        seed=5,
        task=TaskSpec(name="digits", options={"limit": 300}),
        task_seed=0,
        algorithm="qat",
        mode="scratch",
        train={"epochs": 1},
        config_list=[
            {"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_names": ["conv1", "fc2"]},
            {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_names": ["relu1"]},
        ],
        objectives=("accuracy", "latency"),
        fidelity=("accuracy", "latency"),
        latency_table=table,
        latency_source="predicted",
    )
    outcome = run_trial(job)
    assert outcome.state == "COMPLETE", outcome.record.fail_reason
    both = {"conv1": {"weight": 4}, "relu1": {"output": 8}, "fc2": {"weight": 4}}
    predicted = table.predict(both)  # the hand-made table's relative changes, at 10 ms
    assert outcome.values[1] == pytest.approx(predicted)
    record = outcome.record
    assert record.latency_predicted_ms == pytest.approx(predicted) and record.latency_ms is None
    assert record.metrics["latency"] == pytest.approx(predicted)
    # A config the table lacks cannot be predicted: the trial fails and says which layer.
    missing = run_trial(
        TrialJob(
            **{
                **job.__dict__,
                "config_list": [
                    {"quant_types": ["weight"], "quant_bits": {"weight": 2}, "op_names": ["fc1"]}
                ],
            }
        )
    )
    assert missing.state == "FAIL" and "fc1 at {'weight': 2}" in str(missing.record.fail_reason)


def _frame(pairs: list[tuple[int, float | None, float | None]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "number": [n for n, _, _ in pairs],
            "state": ["COMPLETE"] * len(pairs),
            "duplicate_of": [math.nan] * len(pairs),
            "attr.latency_ms": [m for _, m, _ in pairs],
            "attr.latency_predicted_ms": [p for _, _, p in pairs],
        }
    )


def test_the_report_says_how_far_prediction_is_from_measurement() -> None:
    frame = _frame([(0, 10.0, 11.0), (1, 5.0, 5.0), (2, 8.0, 6.0), (3, 4.0, None)])
    error = prediction_error(frame)
    assert error is not None and error.count == 3
    assert error.median_relative == pytest.approx(0.1)  # 10%, 0%, 25%
    assert error.max_relative == pytest.approx(0.25) and error.worst_trial == 2
    assert error.spearman == pytest.approx(1.0)  # same order: 5 < 8 < 10 and 5 < 6 < 11
    lines = "\n".join(latency_prediction_markdown(_table(), frame))
    assert "## Predicted latency" in lines
    assert "holds 4 entries" in lines and "10.000 ms per batch of 1" in lines
    assert "median absolute relative error 10.0%, largest 25.0% (trial 2)" in lines
    assert "Spearman rank correlation 1.00" in lines
    assert "| 2 | 8.000 | 6.000 | 25.0% |" in lines
    # A study without the table or predictions has no such section.
    assert latency_prediction_markdown(None, _frame([(0, 3.0, None)])) == []
    # Only predictions (source: predicted): the section says nothing was timed.
    only = "\n".join(latency_prediction_markdown(_table(), _frame([(0, None, 3.0)])))
    assert "No trial has both" in only


@pytest.mark.slow
def test_a_study_measures_the_table_once_and_reports_the_prediction(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    _onnx()
    spec = load_space(space_file(**LINEAR, n_trials=3))
    lines: list[str] = []

    class Log:
        def message(self, text: str) -> None:
            lines.append(text)

        def count(self, *_: Any) -> None:
            pass

        def start(self, **_: Any) -> None:
            pass

        def trial(self, *_: Any, **__: Any) -> None:
            pass

        def close(self) -> None:
            pass

    study = run_study(prepare(spec), progress=Log())
    table = StudyRecord.of(study).latency_table
    assert table is not None and table.complete and len(table.entries) == 2
    assert any(line.startswith("latency table 2/2: fc2 at weight 8") for line in lines)
    for trial in study.get_trials():
        record = TrialRecord.of(trial)
        assert record.latency_ms is not None and record.latency_ms > 0
        assert record.latency_predicted_ms == pytest.approx(table.predict(record.layer_bits))
    float_trial = TrialRecord.of(study.get_trials()[0])
    assert float_trial.baseline == "float"
    assert float_trial.latency_predicted_ms == table.float_ms
    report = (write_report(study, tmp_path / "report")).read_text()
    assert "## Predicted latency" in report and "Over the 3 trials with both" in report
    csv = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert csv["attr.latency_predicted_ms"].notna().all()
    # Resumed, and read back by another run: not measured again.
    lines.clear()
    context = prepare(spec)
    again = ensure_latency_table(study, spec, context.task, context.plan, None, log=lines.append)
    assert again == table and lines == []
