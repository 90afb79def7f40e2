from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pandas as pd
import pytest

from quantsearch.report import pareto_frame, trials_frame

from ._studies import LAYERS


def test_one_row_per_trial_with_the_trials_values(make_study) -> None:
    study = make_study()
    frame = trials_frame(study)
    trials = study.trials
    assert frame["number"].tolist() == [t.number for t in trials]
    assert frame["state"].tolist() == [t.state.name for t in trials]
    for row, trial in zip(frame.itertuples(), trials, strict=True):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert row.accuracy == trial.values[0]
            assert row.size_bytes == trial.values[1]
            assert row.test_accuracy == trial.user_attrs["test_accuracy"]
            assert row.algorithm == "qat"
            assert json.loads(row.config_list) == trial.user_attrs["config_list"]
            assert row.feasible == all(c <= 0 for c in trial.constraints.values())
        else:
            assert math.isnan(row.accuracy)
            assert row.fail_reason == trial.user_attrs["fail_reason"]
            assert not row.feasible
            assert not row.pareto


def test_failed_trial_keeps_its_recorded_size(make_study) -> None:
    frame = trials_frame(make_study())
    failed = frame[frame["state"] == "FAIL"]
    assert failed["size_bytes"].iloc[0] == 9_000
    assert math.isnan(failed["size_bytes"].iloc[1])


def test_bits_columns_follow_model_order_and_layer_bits(make_study) -> None:
    study = make_study()
    frame = trials_frame(study)
    bits = [c for c in frame.columns if c.startswith("bits.")]
    assert bits == [f"bits.{layer}.{t}" for layer in LAYERS for t in ("weight", "output")]
    for row, trial in zip(frame.to_dict("records"), study.trials, strict=True):
        layer_bits = trial.user_attrs.get("layer_bits", {})
        for layer in LAYERS:
            expected = layer_bits.get(layer, {}).get("weight", math.nan)
            np.testing.assert_equal(row[f"bits.{layer}.weight"], expected)


def test_params_get_their_own_columns(make_study) -> None:
    study = make_study()
    frame = trials_frame(study)
    assert frame.loc[0, "params.conv1"] == "float"
    assert frame.loc[1, "params.fc2"] == 8


def test_pareto_column_is_optunas_front_of_feasible_trials(make_study) -> None:
    study = make_study()
    frame = trials_frame(study)
    assert set(frame.loc[frame["pareto"], "number"]) == {t.number for t in study.best_trials}
    assert frame.loc[frame["pareto"], "feasible"].all()
    # The synthetic study has infeasible trials that would otherwise sit on the front.
    complete = frame[frame["state"] == "COMPLETE"]
    assert not complete["feasible"].all()


def test_pareto_frame_is_sorted_by_size_and_nondominated(make_study) -> None:
    front = pareto_frame(make_study())
    assert front["size_bytes"].is_monotonic_increasing
    # Along a front sorted by size, accuracy never falls.
    assert front["accuracy"].is_monotonic_increasing
    assert front["number"].tolist()[-1] == 0  # the float model is the most accurate


def test_unconstrained_study_counts_every_complete_trial_feasible() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1000.0]))
    study.add_trial(optuna.trial.create_trial(values=[0.8, 2000.0]))
    frame = trials_frame(study)
    assert frame["feasible"].tolist() == [True, True]
    assert frame["pareto"].tolist() == [True, False]
    assert pd.isna(frame["baseline"]).all()


def test_empty_study_gives_an_empty_frame_with_the_columns() -> None:
    frame = trials_frame(optuna.create_study(directions=["maximize", "minimize"]))
    assert frame.empty
    assert {"number", "state", "accuracy", "size_bytes", "pareto"} <= set(frame.columns)


@pytest.mark.parametrize("n_random", [0, 5])
def test_front_of_baselines_only_study(make_study, n_random: int) -> None:
    front = pareto_frame(make_study(n_random=n_random, failed=0))
    assert len(front) >= 1
