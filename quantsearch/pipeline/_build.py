"""From (task, algorithm, config_list, float weights) to a compressed model, and its adaptation."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantsearch.pipeline._float import load_weights
from quantsearch.pipeline._record import TrialMode
from quantsearch.quantization import Quantizer, algorithm_rules, get_quantizer
from quantsearch.tasks import (
    FitResult,
    Measured,
    Task,
    TrainConfig,
    batches_of,
    evaluate,
    fit,
    make_optimizer,
    measure,
    resolve_device,
)

__all__ = ["Adapted", "Compressed", "adapt", "build_compressed", "trial_mode"]


def trial_mode(algorithm: str, config_list: list, *, from_scratch: bool) -> TrialMode:
    """How a trial gets its weights, from the space's algorithm and the trial's config_list."""
    if from_scratch:
        return "scratch"
    if not config_list:
        return "float"
    # An algorithm that never trains (post-training quantization) only calibrates.
    return "finetune" if algorithm_rules(algorithm).trains else "ptq"


@dataclass
class Compressed:
    """A model with its quantizer applied (None for an empty config_list) and its optimizer."""

    model: nn.Module
    quantizer: Quantizer | None
    optimizer: torch.optim.Optimizer | None


def build_compressed(
    task: Task,
    algorithm: str,
    config_list: list[dict],
    *,
    float_state: Mapping[str, Tensor] | None = None,
    train: TrainConfig | None = None,
) -> Compressed:
    """The task's model with ``float_state`` loaded, quantized by ``config_list``.

    With ``train`` an optimizer is built first, since a quantizer may add its own parameters
    to it (LSQ's step sizes) and count steps on it (QAT's quant_start_step). The objective, the
    study's dry run and the export all build their models here.
    """
    model = task.build_model()
    if float_state is not None:
        load_weights(model, float_state, "the float weights")
    optimizer = make_optimizer(model.parameters(), train) if train is not None else None
    quantizer = None
    if config_list:
        quantizer = get_quantizer(algorithm)(
            model, config_list, optimizer=optimizer, dummy_input=task.dummy_input
        )
        model = quantizer.compress()
    return Compressed(model=model, quantizer=quantizer, optimizer=optimizer)


@dataclass(frozen=True)
class Adapted:
    """What adapting a compressed model measured: the validation accuracy (NaN for a task
    that reports none), the steps trained, and the task's validation measurement."""

    val_accuracy: float
    steps: int
    val_measured: Measured | None = None


def adapt(
    compressed: Compressed,
    task: Task,
    mode: TrialMode,
    config: TrainConfig,
    *,
    seed: int,
    calibration_batches: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Adapted:
    """Train (``finetune``, ``scratch``), calibrate (``ptq``) or only evaluate (``float``)."""
    model = compressed.model
    if mode in ("finetune", "scratch"):
        if compressed.optimizer is None:
            raise ValueError("a trained trial needs the optimizer build_compressed makes")
        result: FitResult = fit(
            model, task, compressed.optimizer, config, seed=seed, on_epoch=on_epoch
        )
        return Adapted(
            val_accuracy=float(result.val_accuracy),
            steps=result.steps_run,
            val_measured=result.val_measured,
        )
    if mode == "ptq" and compressed.quantizer is not None:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        generator = torch.Generator().manual_seed(seed)
        batches = batches_of(
            task.train_set, config, shuffle=True, generator=generator, task=task
        )
        model.to(batches.device)
        with compressed.quantizer.calibrate(), torch.no_grad():
            for batch in itertools.islice(batches, calibration_batches):
                task.output(model, batch)
    if not task.is_classifier:
        measured = measure(
            model,
            task,
            task.val_set,
            batch_size=max(256, config.batch_size),
            device=resolve_device(config.device),
        )
        accuracy = measured.values.get("accuracy", float("nan"))
        return Adapted(val_accuracy=accuracy, steps=0, val_measured=measured)
    accuracy = evaluate(
        model, task.val_set, batch_size=max(256, config.batch_size), device=config.device
    )
    return Adapted(val_accuracy=accuracy, steps=0)
