"""Sampler seeds: reproducible for a SQLite study, different per process on a shared database."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import IntDistribution

from quantsearch.search import parse_space
from quantsearch.search._storage import study_sampler

SPACE = {"algorithm": "qat", "params": {"quant_bits": 8}, "sampler": "random"}


def _draws(sampler: optuna.samplers.BaseSampler) -> list[int]:
    study = optuna.create_study(sampler=sampler)
    return [study.ask({"x": IntDistribution(0, 10**9)}).params["x"] for _ in range(4)]


@pytest.mark.parametrize("name", ["random", "tpe", "nsga2"])
def test_processes_on_a_shared_database_draw_different_parameters(name: str) -> None:
    spec = parse_space({**SPACE, "sampler": name}, source="s")
    local = [_draws(study_sampler(spec, 3)) for _ in range(2)]
    assert local[0] == local[1]  # one process per SQLite study: the seed decides
    shared = [_draws(study_sampler(spec, 3, shared=True)) for _ in range(3)]
    assert len({tuple(d) for d in shared}) == 3  # three machines joining at trial 3
