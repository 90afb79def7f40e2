from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest

from ._studies import build_study


@pytest.fixture
def make_study() -> Callable[..., optuna.Study]:
    return build_study
