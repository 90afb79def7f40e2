"""The float model a study's trials start from: the user's weights, or trained once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from quantsearch._paths import replacing
from quantsearch.tasks import (
    DivergedError,
    Task,
    TrainConfig,
    evaluate,
    fit,
    make_optimizer,
    measure,
    resolve_device,
    seed_everything,
)

__all__ = [
    "FloatModel",
    "FloatModelError",
    "load_state",
    "load_weights",
    "make_float_model",
    "state_sha256",
]


class FloatModelError(ValueError):
    """The float weights cannot be loaded, do not fit the task's model, or changed."""


class FloatModel(BaseModel):
    """Where a study's float weights are, their hash, and how good they are (``metric``).

    Stored as the study's ``float_model`` attribute; ``file`` is relative to the study's
    artifacts root (as trial checkpoints are).
    """

    model_config = ConfigDict(frozen=True)

    file: str
    sha256: str
    source: str
    val_accuracy: float
    test_accuracy: float
    """Top-1 accuracies (NaN for a task that reports no accuracy)."""
    steps: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    """The task's metrics on the validation split (a classifier's: its accuracy)."""
    test_metrics: dict[str, float] = Field(default_factory=dict)
    artifact: str | None = None
    """Its artifact id in the study's artifact store, when it has one."""

    def metric(self, name: str, split: str = "val") -> float | None:
        """The float model's value of a task metric (a classifier's accuracy included)."""
        values = self.metrics if split == "val" else self.test_metrics
        if name in values:
            return values[name]
        if name == "accuracy":
            return self.val_accuracy if split == "val" else self.test_accuracy
        return None


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and values (not of its file's bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_state(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a file written by ``torch.save``; FloatModelError names the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FloatModelError(f"{path}: no such state-dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FloatModelError(f"{path}: not a state dict saved by torch.save ({first})") from None
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FloatModelError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def load_weights(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """Load ``state`` into ``model`` strictly; FloatModelError lists what does not fit."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
            )
        raise FloatModelError(f"{where} does not fit the task's model: {'; '.join(parts)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[-1].strip()
        raise FloatModelError(f"{where} does not fit the task's model: {detail}") from None


def make_float_model(
    task: Task,
    *,
    pretrained: str | Path | None,
    train: TrainConfig,
    seed: int,
    out: Path,
    log: Callable[[str], None] = print,
) -> FloatModel:
    """Load ``pretrained`` (else the task's own weights, else train with ``train``), evaluate
    it and write its state dict to ``out``; the returned FloatModel's ``file`` is ``out``'s
    name."""
    seed_everything(seed)
    model = task.build_model()
    steps = 0
    given = pretrained if pretrained is not None else task.pretrained
    if isinstance(given, Mapping):
        load_weights(model, given, f"task {task.name!r}'s pretrained weights")
        source = f"task {task.name}'s pretrained weights"
    elif given is not None:
        load_weights(model, load_state(given), str(given))
        source = f"pretrained {given}"
    else:
        budget = f"{train.steps} steps" if train.steps is not None else f"{train.epochs} epochs"
        log(f"float model: training {budget} (once per study) ...")
        try:
            result = fit(model, task, make_optimizer(model.parameters(), train), train, seed=seed)
        except DivergedError as error:
            raise FloatModelError(
                f"training the float model diverged ({error}); set float_train (a lower lr, "
                "fewer steps) or give trained weights as task.pretrained"
            ) from None
        steps = result.steps_run
        source = f"trained by quantsearch ({budget})"
    if task.is_classifier:
        val_accuracy = evaluate(model, task.val_set, device=train.device)
        test_accuracy = evaluate(model, task.test_set, device=train.device)
        val_metrics, test_metrics = {"accuracy": val_accuracy}, {"accuracy": test_accuracy}
    else:
        device = resolve_device(train.device)
        val_metrics = measure(model, task, task.val_set, device=device).values
        test_metrics = measure(model, task, task.test_set, device=device).values
        val_accuracy = val_metrics.get("accuracy", float("nan"))
        test_accuracy = test_metrics.get("accuracy", float("nan"))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as partial:  # a killed study never leaves half a file
        torch.save(state, partial)
    return FloatModel(
        file=out.name,
        sha256=state_sha256(state),
        source=source,
        val_accuracy=val_accuracy,
        test_accuracy=test_accuracy,
        steps=steps,
        # Only a task's own metrics: a classifier's float model is stored as before.
        **({} if task.is_classifier else {"metrics": val_metrics, "test_metrics": test_metrics}),
    )
