"""Fixtures for the search tests: small spaces on the digits task, written into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ._spaces import write_space


@pytest.fixture
def space_file(tmp_path: Path) -> Callable[..., Path]:
    def make(**changes: Any) -> Path:
        return write_space(tmp_path, **changes)

    return make

