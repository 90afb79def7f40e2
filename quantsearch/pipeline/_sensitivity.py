"""The sensitivity record: what a study measured per layer and bit width on its float model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Bits",
    "ParamSensitivity",
    "Sensitivity",
    "SensitivityEntry",
]

SENSITIVITY_VERSION = 1
FLOAT = "float"

Bits = int | str


class SensitivityEntry(BaseModel):
    """One parameter at one bit width ("float": not quantized), everything else float."""

    model_config = ConfigDict(frozen=True)

    bits: Bits
    loss: float
    accuracy: float
    size_delta: int
    """Bytes this setting adds to the float model's size (negative: it saves them)."""
    hessian: float | None = None
    """Mean Hessian trace x ||Q(W) - W||^2 (method hessian, weights only)."""


class ParamSensitivity(BaseModel):
    """A per-layer bits parameter: the tensors it sets, and its measured bit widths."""

    model_config = ConfigDict(frozen=True)

    param: str
    tensors: list[str]
    """``<layer>.<quant type>`` of each tensor the parameter's bits apply to."""
    trace: float | None = None
    """Mean Hessian trace of the loss over the parameter's weights (method hessian)."""
    entries: list[SensitivityEntry] = Field(default_factory=list)

    def entry(self, bits: Bits) -> SensitivityEntry | None:
        return next((e for e in self.entries if e.bits == bits), None)


class Sensitivity(BaseModel):
    """What a study measured on its float model; stored as its ``sensitivity`` attribute.

    Written as it goes (after each entry), so a killed pass continues where it stopped.
    """

    model_config = ConfigDict(frozen=True)

    version: int = SENSITIVITY_VERSION
    method: str
    batches: int
    samples: int
    """Validation images each measurement evaluated."""
    float_sha256: str
    float_loss: float
    float_accuracy: float
    float_size_bytes: int
    params: list[ParamSensitivity]
    candidates: dict[str, list[Bits]]
    """Every bit width of each parameter, in the space's order."""
    complete: bool = False
    seconds: float = 0.0

    def param(self, name: str) -> ParamSensitivity:
        return next(p for p in self.params if p.param == name)

    def increase(self, name: str, bits: Bits) -> float:
        """The predicted cost of ``name`` at ``bits``: the loss increase over float (method
        loss, and activations), or the Hessian measure (method hessian, weights)."""
        if bits == FLOAT:
            return 0.0
        entry = self.param(name).entry(bits)
        if entry is None:
            raise KeyError(f"{name} at {bits} bits was not measured")
        if self.method == "hessian" and entry.hessian is not None:
            return entry.hessian
        return entry.loss - self.float_loss

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per (parameter, bit width): the table the CLI and the report show."""
        for param in self.params:
            for entry in param.entries:
                yield {
                    "param": param.param,
                    "tensors": ", ".join(param.tensors),
                    "bits": entry.bits,
                    "loss": entry.loss,
                    "loss_increase": entry.loss - self.float_loss,
                    "accuracy": entry.accuracy,
                    "accuracy_drop": self.float_accuracy - entry.accuracy,
                    "size_delta": entry.size_delta,
                    "hessian": entry.hessian,
                    "predicted": self.increase(param.param, entry.bits),
                }
