"""target: the smallest model within an accuracy drop of float; the study stops once met."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quantsearch.cli import main
from quantsearch.pipeline import TrialRecord, build_compressed
from quantsearch.quantization import model_size_bytes
from quantsearch.search import SpaceError, load_space, load_study, prepare
from quantsearch.search._target import TargetState, smallest_size

SpaceFile = Callable[..., Path]

PTQ = {
    "algorithm": "ptq",
    "params": {},
    "calibration": {"batches": 1},
    "n_trials": 8,
    "sampler": "random",
    "baselines": {"float": True, "uniform_bits": [8]},
    "quantize": {"weight": {"op_types": ["Conv2d", "Linear"]}},
    "per_layer": {
        "op_types": ["Conv2d", "Linear"],
        "weight_bits": {"_type": "choice", "_value": [8, "float"]},
    },
}


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"target": {"max_accuracy_drop": 1.5}}, "target.max_accuracy_drop", "in [0, 1)"),
        ({"target": {"drop": 0.1}}, "target.drop", "unknown key 'drop'"),
        (
            {"target": {"max_accuracy_drop": 0.01}, "objectives": ["accuracy", "bitops"]},
            "target",
            "must include accuracy and size_bytes",
        ),
        (
            {"target": {"max_accuracy_drop": 0.01}, "from_scratch": True},
            "target",
            "constraints.min_accuracy",
        ),
    ],
)
def test_the_target_key_is_checked(
    space_file: SpaceFile, changes: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(SpaceError) as caught:
        load_space(space_file(**changes))
    assert caught.value.key == key
    assert words in str(caught.value)


def test_the_smallest_size_is_every_layer_at_its_fewest_bits(space_file: SpaceFile) -> None:
    context = prepare(load_space(space_file(**PTQ)))
    assert context.spec.target is None and "target" not in context.spec.to_dict()
    size = smallest_size(context.task, "ptq", context.plan)
    # Every weight at 8 bits: what the uniform-8 baseline measures too.
    float_size = context.float_size_bytes
    assert size < float_size
    plan = context.plan
    uniform = plan.config_list(plan.values(plan.baseline_params("uniform-8")))
    assert size == model_size_bytes(build_compressed(context.task, "ptq", uniform).model)


def test_a_study_stops_once_the_smallest_config_is_within_the_drop(
    space_file: SpaceFile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = space_file(**{**PTQ, "target": {"max_accuracy_drop": 0.05}})
    out = tmp_path / "report"
    assert main(["study", "--space", str(path), "--quiet", "--report-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    study = load_study(load_space(path))
    target = TargetState.model_validate(study.user_attrs["target"])
    float_accuracy = study.user_attrs["float_model"]["val_accuracy"]
    assert target.min_accuracy == pytest.approx(float_accuracy - 0.05)
    records = [TrialRecord.of(t) for t in study.trials]
    # float, then uniform-8: every weight at 8 bits is the smallest config, within 5 points.
    assert [r.baseline for r in records] == ["float", "uniform-8"]
    assert records[1].size_bytes == target.smallest_bytes
    assert "target: trial 1 is within 5.00% of the float accuracy" in printed
    assert "target: trial 1, the smallest with validation accuracy >=" in printed
    # Trials below the floor are infeasible for the sampler and the front.
    for trial, record in zip(study.trials, records, strict=True):
        assert record.val_accuracy is not None
        expected = target.min_accuracy - record.val_accuracy
        assert trial.constraints == {"min_accuracy": pytest.approx(expected)}
    text = (out / "report.md").read_text()
    assert text.index("## Target") < text.index("## Summary")
    assert "**trial 1**" in text and "so the study stopped there" in text


def test_an_infinitely_good_value_meets_a_bound_and_a_nan_breaks_it() -> None:
    import math

    from quantsearch.search._sections import parse_constraints
    from quantsearch.search._target import constraint_values, meets

    constraints = parse_constraints({"min_sqnr_db": 15, "max_kl": 0.1})

    def values(sqnr: float, kl: float) -> dict[str, float]:
        return constraint_values(constraints, TrialRecord(metrics={"sqnr_db": sqnr, "kl": kl}))

    # Outputs equal to the float model's: no noise (SQNR +inf), met.
    assert values(math.inf, 0.0) == {"min_sqnr_db": -math.inf, "max_kl": -0.1}
    assert values(20.0, 0.05) == pytest.approx({"min_sqnr_db": -5.0, "max_kl": -0.05})
    # A broken trial: NaN, or infinitely bad, is outside every bound on it.
    assert values(math.nan, math.inf) == {"min_sqnr_db": math.inf, "max_kl": math.inf}
    assert values(-math.inf, 0.0)["min_sqnr_db"] == math.inf
    state = TargetState(
        max_accuracy_drop=math.nan, float_accuracy=math.inf, min_accuracy=20.0,
        metric="sqnr_db", relative=False, smallest_bytes=1,
    )  # fmt: skip
    assert meets(state, math.inf) and meets(state, 25.0)
    assert not meets(state, math.nan) and not meets(state, 19.0)
