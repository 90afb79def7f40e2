"""How a model is trained: TrainConfig, the one validator of training settings."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = [
    "DEVICES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "FieldRule",
    "TrainConfig",
    "TrainConfigError",
    "resolve_device",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("none", "cosine", "step")
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained.

    Attributes:
        epochs: passes over the training set (0 trains nothing, only validates).
        steps: if given, the budget in optimizer steps instead of ``epochs``: training runs
            exactly this many steps, passing over the training set as often as needed (the
            last pass may stop part way).
        batch_size: examples per optimizer step.
        optimizer: "sgd" (with ``momentum``), "adam" or "adamw".
        lr: learning rate at the start of training.
        momentum: SGD momentum (ignored by adam/adamw).
        weight_decay: L2 penalty (decoupled for adamw).
        lr_schedule: "none"; "cosine" (per step, from ``lr`` down to 0); "step" (lr/10 after
            half of the steps, lr/100 after three quarters).
        device: "cpu", "cuda" (or "cuda:N"), or "auto" (CUDA when available).
        num_threads: if given, ``torch.set_num_threads`` for this process before training.
    """

    epochs: int = 3
    steps: int | None = None
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    device: str = "cpu"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None and item.name in _UNSET_ALLOWED:
                continue
            rule = _RULES[item.name]
            if not rule.check(value):
                raise TrainConfigError(item.name, value, rule.allowed)
            if item.name in _FLOATS:
                object.__setattr__(self, item.name, float(value))

    @staticmethod
    def rule(key: str, *, search: bool = False) -> FieldRule:
        """What the setting ``key`` takes. ``search``: as a search space gives it, where
        ``epochs`` and ``steps`` are at least 1 (its trials train)."""
        if search and key in _SEARCH_RULES:
            return _SEARCH_RULES[key]
        return _RULES[key]

    @classmethod
    def checked(cls, values: Mapping[str, Any], *, search: bool = False) -> dict[str, Any]:
        """Some settings (a mapping of known keys) checked one by one in their order, the
        numbers of float settings as floats; :class:`TrainConfigError` names the first one
        refused. ``search``: as a search space gives them (see :meth:`rule`), every key with
        a value."""
        out: dict[str, Any] = {}
        for key, value in values.items():
            rule = cls.rule(key, search=search)
            if not rule.check(value) and not (
                value is None and key in _UNSET_ALLOWED and not search
            ):
                raise TrainConfigError(key, value, rule.allowed)
            out[key] = float(value) if key in _FLOATS and value is not None else value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys raise ValueError.

        Float fields also accept numeric strings, because YAML reads ``1e-3`` as a string.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown training option(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        converted = dict(values)
        for key in _FLOATS:
            value = converted.get(key)
            if isinstance(value, str):
                try:
                    converted[key] = float(value)
                except ValueError:
                    raise ValueError(f"TrainConfig.{key} must be a number, got {value!r}") from None
        return cls(**converted)


@dataclass(frozen=True)
class FieldRule:
    """What one training setting takes: ``allowed`` says it in words, ``check`` tests one
    value; ``integral``: integers only (a searched range of it must give integers)."""

    allowed: str
    check: Callable[[Any], bool]
    integral: bool = False


class TrainConfigError(ValueError):
    """A training setting :class:`TrainConfig` refuses: its ``key``, ``value`` and what is
    ``allowed``."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"TrainConfig.{key} must be {allowed}, got {value!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.value, self.allowed))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    # Finite only: .inf and .nan pass no range check a run could use.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_device(value: Any) -> bool:
    if isinstance(value, str) and re.fullmatch(r"cuda:\d+", value):
        return True
    return value in DEVICES


def _count(minimum: int) -> FieldRule:
    return FieldRule(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum, True)


_RULES: dict[str, FieldRule] = {
    "epochs": _count(0),
    "steps": _count(0),
    "batch_size": _count(1),
    "optimizer": FieldRule(f"one of {', '.join(OPTIMIZERS)}", lambda v: v in OPTIMIZERS),
    "lr": FieldRule("a number > 0", lambda v: _is_real(v) and v > 0),
    "momentum": FieldRule("a number in [0, 1)", lambda v: _is_real(v) and 0 <= v < 1),
    "weight_decay": FieldRule("a number >= 0", lambda v: _is_real(v) and v >= 0),
    "lr_schedule": FieldRule(f"one of {', '.join(LR_SCHEDULES)}", lambda v: v in LR_SCHEDULES),
    "device": FieldRule("one of cpu, cuda, cuda:N, auto", _is_device),
    "num_threads": _count(1),
}
# A search's trials train: 0 epochs or steps (validate only) is no trial of it.
_SEARCH_RULES = {"epochs": _count(1), "steps": _count(1)}
# Settings whose None means "not set" (steps: use epochs; num_threads: leave torch's).
_UNSET_ALLOWED = ("steps", "num_threads")
_FLOATS = ("lr", "momentum", "weight_decay")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn "auto" into "cuda" when CUDA is available (else "cpu"); check CUDA exists."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available")
    return resolved
