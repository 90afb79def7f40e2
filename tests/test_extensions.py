"""A sampler and a metric added from outside the package (as CONTRIBUTING.md says) run a whole
study: the space names them, the study uses them, the report shows the metric."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from quantsearch.pipeline import METRICS, Evaluated, Metric, register_metric
from quantsearch.report import write_report
from quantsearch.search import (
    SAMPLERS,
    SamplerOption,
    SpaceError,
    load_space,
    prepare,
    register_sampler,
    run_study,
)
from tests.search._spaces import write_space


class _CountingSampler(optuna.samplers.RandomSampler):
    """Random search that counts the parameters it drew."""

    drawn = 0

    def sample_independent(self, *args: Any, **kwargs: Any) -> Any:
        _CountingSampler.drawn += 1
        return super().sample_independent(*args, **kwargs)


def _parameters(evaluated: Evaluated) -> float:
    return float(sum(p.numel() for p in evaluated.model.parameters()))


@pytest.fixture
def toys() -> Iterator[None]:
    def counting(options: Mapping[str, Any], *, seed: int, n_trials: int) -> Any:
        assert options == {"spread": 3}
        return _CountingSampler(seed=seed)

    spread = SamplerOption("an odd integer", lambda v: isinstance(v, int) and v % 2 == 1)
    register_sampler("counting", options={"spread": spread})(counting)
    register_metric(Metric("parameters", "minimize", "parameters", _parameters, relative=True))
    _CountingSampler.drawn = 0
    yield
    del SAMPLERS["counting"], METRICS["parameters"]


def test_a_toy_sampler_and_metric_run_a_study_and_reach_its_report(
    toys: None, tmp_path: Path
) -> None:
    space = write_space(
        tmp_path,
        sampler={"name": "counting", "spread": 3},
        objectives=["accuracy", "parameters"],
        n_trials=4,
    )
    study = run_study(prepare(load_space(space)))
    assert _CountingSampler.drawn > 0  # the two baselines are queued; the rest are drawn
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    frame = pd.read_csv(write_report(study, tmp_path / "report").parent / "trials.csv")
    assert (frame["parameters"] > 0).all()
    assert "parameters" in (tmp_path / "report" / "report.md").read_text()


def test_a_toy_samplers_option_is_checked_by_its_own_rule(toys: None, tmp_path: Path) -> None:
    space = write_space(tmp_path, sampler={"name": "counting", "spread": 2})
    with pytest.raises(SpaceError, match=r"sampler\.spread: 2: spread is an odd integer, for "
                       r"the counting sampler only"):
        load_space(space)
