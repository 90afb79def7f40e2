"""A space that searches ptq's rounding, bias correction and equalization like any parameter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantsearch.pipeline import TrialRecord
from quantsearch.quantization import PtqQuantizer
from quantsearch.search import SpaceError, load_space, prepare, run_study
from quantsearch.search._config_builder import ModelLayers, SpacePlan
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._objective import build_task

SpaceFile = Callable[..., Path]


def _rounding_space(space_file: SpaceFile) -> Path:
    return space_file(
        algorithm="ptq",
        calibration={"batches": 2},
        params={
            "output_bits": 8,
            "rounding": {"_type": "choice", "_value": ["nearest", "adaround"]},
            "adaround_iters": 20,
        },
    )


def test_a_searched_rounding_reaches_the_quantizer(space_file: SpaceFile) -> None:
    spec = load_space(_rounding_space(space_file))
    task = build_task(spec.task, spec.seed)
    model = task.build_model()
    plan = SpacePlan(spec, ModelLayers.of(model))
    values = {
        key: (param.candidates()[-1] if isinstance(param, NniParam) else param)
        for key, param in plan.params.items()
    }
    values.update({key: 4 for key in values if key.endswith("weight_bits")})
    assert values["rounding"] == "adaround"
    config_list = plan.config_list(values)
    assert all(entry["rounding"] == "adaround" for entry in config_list)
    x = next(iter(task.train_set))[0].unsqueeze(0)
    quantizer = PtqQuantizer(model, config_list, dummy_input=x)
    quantizer.compress()
    with quantizer.calibrate():
        model(torch.cat([x] * 8))
    assert quantizer.fit_records  # the weighted layers were rounded with AdaRound
    assert {r.rounding for r in quantizer.fit_records.values()} == {"adaround"}


@pytest.mark.slow
def test_rounding_is_searched_and_every_trial_runs(space_file: SpaceFile) -> None:
    path = space_file(
        n_trials=2,
        algorithm="ptq",
        calibration={"batches": 2},
        baselines={"float": False},
        params={
            "output_bits": 8,
            "rounding": {"_type": "choice", "_value": ["nearest", "adaround"]},
            "bias_correction": {"_type": "choice", "_value": [True, False]},
            "adaround_iters": 30,
        },
    )
    spec = load_space(path)
    study = run_study(prepare(spec))
    records = [TrialRecord.of(t) for t in study.get_trials()]
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 2
    assert [r.mode for r in records] == ["ptq", "ptq"]
    weight_entries = [
        e for r in records for e in (r.config_list or []) if "weight" in e["quant_types"]
    ]
    assert {e["rounding"] for e in weight_entries} <= {"nearest", "adaround"}
    assert all(e["adaround_iters"] == 30 for e in weight_entries)
    assert all(r.val_accuracy is not None and r.val_accuracy > 0.5 for r in records)


def test_a_bad_rounding_value_names_the_parameter(space_file: SpaceFile) -> None:
    path = space_file(
        algorithm="ptq", params={"rounding": {"_type": "choice", "_value": ["nearest", "up"]}}
    )
    with pytest.raises(SpaceError, match=r"params\.rounding"):
        load_space(path)


def test_rounding_belongs_to_the_ptq_algorithm(space_file: SpaceFile) -> None:
    path = space_file(params={"quant_bits": 8, "rounding": "adaround"})
    with pytest.raises(SpaceError, match=r"params\.rounding: only the ptq algorithm has rounding"):
        load_space(path)
