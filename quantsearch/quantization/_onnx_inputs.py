"""A model's inputs of any structure, as the ONNX export traces them and onnxruntime is fed.

A model's example input is a tensor, a tuple of positional arguments or a dict of keyword
arguments (as ``torch.onnx.export`` takes ``args`` and ``kwargs``). The exported graph has one
input per tensor, named by one rule that export and feed share: a lone positional tensor is
``input``, several are ``input_0``, ``input_1``..., a keyword argument keeps its key (and
positional arguments given beside keywords take their name in ``forward``'s signature). Other
values (None, numbers) are constants of the trace, not graph inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._onnx_deploy import OnnxExportError

__all__ = ["ModelInputs"]

_ARGUMENT_TYPES = (type(None), bool, int, float, str, Tensor)


@dataclass(frozen=True)
class ModelInputs:
    """Positional and keyword arguments of one model call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example: Any) -> ModelInputs:
        """A tensor, a tuple (or list) of positional arguments or a mapping of keyword
        arguments; each argument a tensor or a constant. Raises OnnxExportError otherwise."""
        if isinstance(example, ModelInputs):
            return example
        if isinstance(example, Tensor):
            inputs = cls((example,))
        elif isinstance(example, Mapping):
            inputs = cls((), {str(k): v for k, v in example.items()})
        elif isinstance(example, tuple | list):
            inputs = cls(tuple(example))
        else:
            raise OnnxExportError(
                "dummy_input must be a tensor, a tuple of positional arguments or a dict of "
                f"keyword arguments, got {type(example).__name__}"
            )
        for name, value in inputs.named():
            if not isinstance(value, _ARGUMENT_TYPES):
                raise OnnxExportError(
                    f"dummy_input argument {name!r} is a {type(value).__name__}: each argument "
                    "must be a tensor or a constant (nested containers cannot be fed to "
                    "onnxruntime)"
                )
        if not inputs.tensors():
            raise OnnxExportError("dummy_input holds no tensor")
        return inputs

    def named(self) -> list[tuple[str, Any]]:
        """(graph input name, value) of every argument, positional ones first."""
        positional = (
            [("input", self.args[0])] if len(self.args) == 1
            else [(f"input_{i}", value) for i, value in enumerate(self.args)]
        )
        return positional + list(self.kwargs.items())

    def tensors(self) -> dict[str, Tensor]:
        """Graph input name -> tensor."""
        return {name: value for name, value in self.named() if isinstance(value, Tensor)}

    def keyword_form(self, model: nn.Module) -> ModelInputs:
        """Positional arguments given beside keyword ones become keywords, named as in
        ``model.forward``'s signature (the exporter names keyword inputs by their key)."""
        if not (self.args and self.kwargs):
            return self
        try:
            bound = inspect.signature(model.forward).bind(*self.args, **self.kwargs)
        except (TypeError, ValueError) as error:
            raise OnnxExportError(f"the example input does not fit the model: {error}") from None
        return ModelInputs((), dict(bound.arguments))

    def map(self, fn: Any) -> ModelInputs:
        """The same structure with ``fn`` applied to every tensor."""
        def apply(value: Any) -> Any:
            return fn(value) if isinstance(value, Tensor) else value

        return ModelInputs(
            tuple(apply(v) for v in self.args), {k: apply(v) for k, v in self.kwargs.items()}
        )

    def batch_size(self) -> int | None:
        """The leading dimension of the first tensor with one."""
        return next((t.shape[0] for t in self.tensors().values() if t.dim()), None)

    def batched(self, size: int) -> ModelInputs:
        """A batch of ``size``: every tensor that has the example's batch dimension repeated
        (and cut) along it; other tensors as they are."""
        batch = self.batch_size()

        def repeat(t: Tensor) -> Tensor:
            if batch is None or not t.dim() or t.shape[0] != batch:
                return t
            return torch.cat([t] * -(-size // batch))[:size]

        return self.map(repeat)

    def feed(self, model: nn.Module) -> dict[str, Any]:
        """The onnxruntime feed of the graph ``export_onnx(model, ...)`` wrote: graph input
        name -> numpy array."""
        tensors = self.keyword_form(model).tensors()
        return {name: t.detach().cpu().numpy() for name, t in tensors.items()}

    def call(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)
