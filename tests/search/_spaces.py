"""Small search spaces on the digits task, for the search and CLI tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Few training images and one epoch: a trial takes a fraction of a second.
SMALL_SPACE: dict[str, Any] = {
    "study_name": "small",
    "task": {"name": "digits", "options": {"limit": 300}},
    "algorithm": "qat",
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.003},
    "sampler": {"name": "random"},
    "n_trials": 4,
    "baselines": {"float": True, "uniform_bits": [8]},
    "quantize": {"weight": {"op_types": ["Conv2d", "Linear"]}, "output": {"op_types": ["ReLU6"]}},
    "params": {
        "output_bits": {"_type": "choice", "_value": [4, 8]},
        "quant_start_step": {"_type": "randint", "_value": [0, 5]},
    },
    "per_layer": {
        "op_types": ["Conv2d", "Linear"],
        "weight_bits": {"_type": "choice", "_value": [2, 4, 8, "float"]},
    },
}


def write_space(folder: Path, name: str = "space.yaml", **changes: Any) -> Path:
    """SMALL_SPACE with ``changes`` (a None value removes the key), storage in ``folder``."""
    space = {**SMALL_SPACE, "storage": str(folder / "studies" / "small.db"), **changes}
    space = {k: v for k, v in space.items() if v is not None}
    path = folder / name
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path
