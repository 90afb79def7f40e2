"""What the study benchmarks share: their common arguments, and running a space written as a
dict (the benchmark networks' weights are absolute paths, so the space is written per run)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from quantsearch.search import load_space, prepare, run_study

__all__ = ["HERE", "parser", "ptq_study", "run_space"]

HERE = Path(__file__).resolve().parent


def parser(description: str, *, weights: str, out: str, trials: int) -> argparse.ArgumentParser:
    """The arguments every study benchmark takes: data, cached float weights, output folder,
    trial count and the number of validation and test images."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/mnist"))
    result.add_argument("--weights", type=Path, default=HERE / ".cache" / weights)
    result.add_argument("--out", type=Path, default=Path(out))
    result.add_argument("--trials", type=int, default=trials)
    result.add_argument("--eval-images", type=int, default=1000)
    return result


def ptq_study(args: argparse.Namespace, network: str) -> dict[str, Any]:
    """The space's task (``network`` on real MNIST from the cached weights) and its ptq
    settings (seed 0, 8 calibration batches)."""
    return {
        "task": {
            "name": f"{HERE / '_mnist_networks_task.py'}:make_task",
            "data_dir": str(args.data_dir),
            "options": {"network": network, "pretrained": str(args.weights.resolve()),
                        "eval_limit": args.eval_images},
        },
        "algorithm": "ptq",
        "seed": 0,
        "calibration": {"batches": 8},
    }


def run_space(space: dict[str, Any], path: Path) -> tuple[Any, float]:
    """Write ``space`` to ``path``, run its study; the study and its seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    started = time.perf_counter()
    study = run_study(prepare(load_space(path)))
    return study, time.perf_counter() - started
