"""One trial: build the model, quantize it with a config_list, train, evaluate, measure.

Everything here runs in whichever process trains (the study's own, or a worker), takes a
picklable :class:`TrialJob` and returns a picklable :class:`TrialOutcome`; it never touches the
Optuna storage.
"""

from __future__ import annotations

import functools
import json
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantsearch.quantization import get_quantizer, model_size_bytes
from quantsearch.search._space import HopelessRule, TaskSpec
from quantsearch.tasks import (
    DivergedError,
    Task,
    TrainConfig,
    evaluate,
    fit,
    get_task,
    make_optimizer,
    seed_everything,
)

__all__ = [
    "HopelessTrial",
    "TrialJob",
    "TrialOutcome",
    "build_task",
    "run_trial",
    "train_config",
    "trial_seed",
]


def trial_seed(study_seed: int, trial_number: int) -> int:
    """A trial's seed, from the study's seed and the trial's number (independent streams)."""
    state = np.random.SeedSequence([study_seed, trial_number]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


@functools.lru_cache(maxsize=4)
def _cached_task(name: str, data_dir: str | None, options_json: str, seed: int) -> Task:
    return get_task(name, data_dir=data_dir, options=json.loads(options_json), seed=seed)


def build_task(spec: TaskSpec, seed: int) -> Task:
    """The task of a space (built once per process); its splits come from ``seed``."""
    return _cached_task(spec.name, spec.data_dir, json.dumps(spec.options, sort_keys=True), seed)


def train_config(task: Task, train: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The task's own defaults, replaced by the space's ``train`` keys and searched values."""
    return replace(task.default_train_config, **train, **overrides)


class HopelessTrial(Exception):
    """Raised from the epoch callback to stop a trial still at chance accuracy."""


@dataclass(frozen=True)
class TrialJob:
    """Everything a process needs to train one trial."""

    number: int
    seed: int
    task: TaskSpec
    task_seed: int
    algorithm: str
    train: dict[str, Any]
    config_list: list[dict[str, Any]]
    checkpoint: str | None = None
    hopeless: HopelessRule | None = None
    # torch threads for this trial, set by ``fit``; the study leaves it None, as its worker
    # processes set their threads once when they start.
    num_threads: int | None = None


@dataclass(frozen=True)
class TrialOutcome:
    """What one trial measured, or why it did not finish ("FAIL" / "PRUNED" + reason)."""

    state: str
    val_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    size_bytes: int = 0
    train_seconds: float = 0.0
    layer_bits: dict[str, dict[str, int]] = field(default_factory=dict)
    reason: str | None = None
    detail: str | None = None


def run_trial(job: TrialJob) -> TrialOutcome:
    """Train and measure one trial; a diverged, hopeless or crashing trial is an outcome too."""
    started = time.perf_counter()
    try:
        return _run(job, started)
    except HopelessTrial as stop:
        return TrialOutcome(
            state="PRUNED",
            reason=str(stop),
            train_seconds=time.perf_counter() - started,
        )
    except DivergedError as error:
        return TrialOutcome(
            state="FAIL",
            reason=f"diverged: {error}",
            train_seconds=time.perf_counter() - started,
        )
    except Exception as error:
        return TrialOutcome(
            state="FAIL",
            reason=f"{type(error).__name__}: {error}",
            detail=traceback.format_exc(limit=-8),
            train_seconds=time.perf_counter() - started,
        )


def _run(job: TrialJob, started: float) -> TrialOutcome:
    task = build_task(job.task, job.task_seed)
    config = train_config(task, job.train, num_threads=job.num_threads)
    seed_everything(job.seed)
    model = task.build_model()
    # The optimizer comes first: a quantizer may add its own parameters to it (LSQ scales).
    optimizer = make_optimizer(model.parameters(), config)
    quantizer = None
    if job.config_list:
        quantizer = get_quantizer(job.algorithm)(
            model, job.config_list, optimizer=optimizer, dummy_input=task.dummy_input
        )
        model = quantizer.compress()
    result = fit(
        model,
        task,
        optimizer,
        config,
        seed=job.seed,
        on_epoch=_hopeless_check(job.hopeless, task.num_classes),
    )
    test_accuracy = evaluate(model, task.test_set, device=config.device)
    size = model_size_bytes(model)
    if job.checkpoint is not None:
        path = Path(job.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return TrialOutcome(
        state="COMPLETE",
        val_accuracy=float(result.val_accuracy),
        test_accuracy=float(test_accuracy),
        size_bytes=int(size),
        train_seconds=time.perf_counter() - started,
        layer_bits=quantizer.layer_bits() if quantizer is not None else {},
    )


def _hopeless_check(rule: HopelessRule | None, num_classes: int) -> Any:
    if rule is None:
        return None
    threshold = 1.0 / num_classes + rule.margin

    def check(epoch: int, val_accuracy: float) -> None:
        if epoch + 1 == rule.after_epoch and val_accuracy < threshold:
            raise HopelessTrial(
                f"hopeless: validation accuracy {val_accuracy:.3f} after epoch {epoch + 1} "
                f"is below chance + margin ({threshold:.3f})"
            )

    return check
