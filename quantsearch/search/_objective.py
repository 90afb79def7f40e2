"""One trial: build the model from the float weights, quantize it with a config_list, adapt it
(fine-tune, calibrate, or train from scratch), evaluate, measure.

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

from quantsearch.pipeline import (
    FIDELITY_METRICS,
    LATENCY_METRIC,
    METRICS,
    Evaluated,
    LatencySetup,
    LatencyTable,
    ModelProfile,
    TrialMode,
    TrialRecord,
    adapt,
    build_compressed,
    get_metric,
    load_state,
    measure_split,
)
from quantsearch.quantization import model_size_bytes
from quantsearch.search._spec import HopelessRule, TaskSpec
from quantsearch.tasks import (
    DivergedError,
    Task,
    TrainConfig,
    get_task,
    resolve_device,
    seed_everything,
)

__all__ = [
    "HopelessTrial",
    "TrialJob",
    "TrialOutcome",
    "build_task",
    "float_state_of",
    "model_profile",
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
    """Everything a process needs to run one trial."""

    number: int
    seed: int
    task: TaskSpec
    task_seed: int
    algorithm: str
    mode: TrialMode
    train: dict[str, Any]
    config_list: list[dict[str, Any]]
    objectives: tuple[str, ...]
    # The searched training settings alone, recorded with the trial.
    searched_train: dict[str, Any] = field(default_factory=dict)
    float_weights: str | None = None
    calibration_batches: int = 32
    checkpoint: str | None = None
    hopeless: HopelessRule | None = None
    # torch threads for this trial, set by ``fit``; the study leaves it None, as its worker
    # processes set their threads once when they start.
    num_threads: int | None = None
    # Fidelity metrics the space names (objectives, constraints, target), measured against
    # the float model's outputs.
    fidelity: tuple[str, ...] = ()
    # How the latency metric is timed (the space's ``latency:``); measured when the space
    # sets it or names the metric.
    latency: LatencySetup | None = None
    # The study's per-layer latency table (``latency: {table: true}``): the trial records the
    # latency it predicts, and with ``latency_source`` "predicted" uses it as the metric
    # instead of timing an export.
    latency_table: LatencyTable | None = None
    latency_source: str = "measured"

    def run(self) -> TrialOutcome:
        return run_trial(self)

    def on_device(self, device: str) -> TrialJob:
        return replace(self, train={**self.train, "device": device})

    def died(self, reason: str) -> TrialOutcome:
        record = TrialRecord(fail_reason=f"{reason} while training")
        return TrialOutcome(state="FAIL", record=record)


@dataclass(frozen=True)
class TrialOutcome:
    """What one trial measured (its record and objective values), or why it did not finish."""

    state: str
    record: TrialRecord
    values: tuple[float, ...] = ()


def run_trial(job: TrialJob) -> TrialOutcome:
    """Run and measure one trial; a diverged, hopeless or crashing trial is an outcome too."""
    started = time.perf_counter()
    record = TrialRecord(
        algorithm=job.algorithm,
        mode=job.mode,
        config_list=job.config_list,
        train=job.searched_train,
        seed=job.seed,
    )
    try:
        return _run(job, record, started)
    except HopelessTrial as stop:
        state, reason, detail = "PRUNED", str(stop), None
    except DivergedError as error:
        state, reason, detail = "FAIL", f"diverged: {error}", None
    except Exception as error:
        state, reason = "FAIL", f"{type(error).__name__}: {error}"
        detail = traceback.format_exc(limit=-8)
    return TrialOutcome(
        state=state,
        record=record.model_copy(
            update={
                "fail_reason": reason,
                "fail_detail": detail,
                "train_seconds": time.perf_counter() - started,
            }
        ),
    )


@functools.lru_cache(maxsize=2)
def _float_state(path: str, modified: float) -> dict[str, torch.Tensor]:
    return load_state(path)


def float_state_of(path: str) -> dict[str, torch.Tensor]:
    """The float weights in ``path``, read once per process (again if the file changes)."""
    return _float_state(path, Path(path).stat().st_mtime)


@functools.lru_cache(maxsize=4)
def _profile(task: Task) -> ModelProfile:
    return ModelProfile.trace(task.build_model(), task.dummy_input)


def model_profile(task: Task) -> ModelProfile:
    """The layer order and MACs of the task's model, traced once per process."""
    return _profile(task)


def _run(job: TrialJob, record: TrialRecord, started: float) -> TrialOutcome:
    task = build_task(job.task, job.task_seed)
    config = train_config(task, job.train, num_threads=job.num_threads)
    seed_everything(job.seed)
    float_state = None
    if job.mode != "scratch":
        if job.float_weights is None:
            raise ValueError(f"a {job.mode} trial needs the study's float weights")
        float_state = float_state_of(job.float_weights)
    trains = job.mode in ("finetune", "scratch")
    compressed = build_compressed(
        task,
        job.algorithm,
        job.config_list,
        float_state=float_state,
        train=config if trains else None,
    )
    adapted = adapt(
        compressed,
        task,
        job.mode,
        config,
        seed=job.seed,
        calibration_batches=job.calibration_batches,
        on_epoch=_hopeless_check(job.hopeless, task.num_classes) if trains else None,
    )
    model = compressed.model
    device = resolve_device(config.device)
    fidelity = tuple(name for name in job.fidelity if name in FIDELITY_METRICS)
    splits = {
        split: measure_split(
            model,
            task,
            split,
            device=device,
            batch_size=max(256, config.batch_size) if split == "val" else 256,
            measured=adapted.val_measured if split == "val" else None,
            fidelity_names=fidelity,
            float_weights=job.float_weights,
        )
        for split in ("val", "test")
    }
    layer_bits = compressed.quantizer.layer_bits() if compressed.quantizer is not None else {}
    latency = _latency(job, model, task, layer_bits)
    # A classifier's validation accuracy is the one adapting measured (exactly as before).
    if task.is_classifier:
        splits["val"].values["accuracy"] = adapted.val_accuracy
    val, test = splits["val"], splits["test"]
    test_accuracy = test.values.get("accuracy")
    size = model_size_bytes(model)
    profile = model_profile(task)
    evaluated = Evaluated(
        model=model,
        task=task,
        layer_bits=layer_bits,
        profile=profile,
        val_accuracy=adapted.val_accuracy,
        size_bytes=size,
        metrics=val.values if latency is None else {**val.values, LATENCY_METRIC: latency[0]},
    )
    values = tuple(_objective_value(name, evaluated) for name in job.objectives)
    if job.checkpoint is not None:
        path = Path(job.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return TrialOutcome(
        state="COMPLETE",
        values=values,
        record=record.model_copy(
            update={
                "val_accuracy": val.values.get("accuracy"),
                "test_accuracy": None if test_accuracy is None else float(test_accuracy),
                "val_samples": len(task.val_set),  # type: ignore[arg-type]
                "test_samples": len(task.test_set),  # type: ignore[arg-type]
                # A classifier's record holds what it held before; other tasks every metric.
                **_metric_fields(task, val, test),
                "size_bytes": int(size),
                "bitops": profile.bitops(layer_bits),
                "layer_bits": layer_bits,
                "steps": adapted.steps,
                "train_seconds": time.perf_counter() - started,
                **({} if latency is None else {
                    **latency[1],
                    # In ``metrics`` too, where constraints and reports read a metric.
                    "metrics": {
                        **_metric_fields(task, val, test).get("metrics", {}),
                        LATENCY_METRIC: latency[0],
                    },
                    # The same model on any split: one latency.
                    "test_metrics": {
                        **_metric_fields(task, val, test).get("test_metrics", {}),
                        LATENCY_METRIC: latency[0],
                    },
                }),
            }
        ),
    )


def _latency(
    job: TrialJob, model: torch.nn.Module, task: Task, layer_bits: dict[str, dict[str, int]]
) -> tuple[float, dict] | None:
    """The trial's latency (ms) and its record fields, when the space sets ``latency:`` or
    names the metric; the metrics mapping holds it too, so constraints on it work. With the
    study's latency table the predicted latency is recorded beside the measured one, or, with
    ``latency_source`` "predicted", is the latency (nothing exported or timed)."""
    if job.latency is None and LATENCY_METRIC not in job.fidelity:
        return None
    predicted = None
    if job.latency_table is not None:
        try:
            predicted = job.latency_table.predict(layer_bits)
        except KeyError as missing:
            if job.latency_source == "predicted":
                raise KeyError(f"{missing.args[0]}: cannot predict this trial's latency") from None
    if job.latency_source == "predicted" and predicted is not None:
        setup = (job.latency or LatencySetup()).to_dict()
        return predicted, {"latency_predicted_ms": predicted, "latency_setup": setup}
    from quantsearch.pipeline import measure_latency

    measured = measure_latency(
        model, task.dummy_input, job.latency or LatencySetup(),
        config={"algorithm": job.algorithm, "config_list": job.config_list},
        # The float architecture, timed in turn with the trial's model: a speedup that load
        # from other jobs does not skew (its weights do not change its time).
        reference=task.build_model().eval(),
        reference_key=f"{job.task.name}:{json.dumps(job.task.options, sort_keys=True)}",
    )
    fields = measured.record_fields()
    if predicted is not None:
        fields["latency_predicted_ms"] = predicted
    return measured.median_ms, fields


def _objective_value(name: str, evaluated: Evaluated) -> float:
    """A registered metric computed, else the task's metric as measured on validation."""
    if name in METRICS:
        return float(get_metric(name).compute(evaluated))
    if name not in evaluated.metrics:
        raise KeyError(
            f"the task's evaluate did not report {name!r} (it reported: "
            f"{', '.join(evaluated.metrics) or 'nothing'})"
        )
    return float(evaluated.metrics[name])


def _metric_fields(task: Task, val: Any, test: Any) -> dict[str, Any]:
    only_accuracy = task.is_classifier and set(val.values) == {"accuracy"}
    if only_accuracy:
        return {}
    return {
        "metrics": val.values,
        "test_metrics": test.values,
        "intervals": val.intervals,
        "test_intervals": test.intervals,
    }


def _hopeless_check(rule: HopelessRule | None, num_classes: int | None) -> Any:
    if rule is None or num_classes is None:
        return None
    threshold = 1.0 / num_classes + rule.margin

    def check(epoch: int, val_accuracy: float) -> None:
        if epoch + 1 == rule.after_epoch and val_accuracy < threshold:
            raise HopelessTrial(
                f"hopeless: validation accuracy {val_accuracy:.3f} after epoch {epoch + 1} "
                f"is below chance + margin ({threshold:.3f})"
            )

    return check
