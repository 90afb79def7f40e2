"""An ONNX file run in onnxruntime as a module: the task's own evaluation measures it, and
every call compares its outputs with the PyTorch model's on the same inputs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from quantsearch.export._errors import ExportError
from quantsearch.pipeline import onnx_session
from quantsearch.quantization import ModelInputs

__all__ = ["OutputComparison", "RuntimeModel", "output_leaves"]


def output_leaves(value: Any) -> list[Tensor]:
    """The tensors of a model's output in the exporter's order (tuples, lists, dicts and
    ``ModelOutput``-like mappings flattened; None and other values skipped)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in output_leaves(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in output_leaves(item)]
    return []


def _rebuild(value: Any, leaves: Iterator[Tensor]) -> Any:
    """``value``'s structure with its tensors replaced, in order, by ``leaves``."""
    if isinstance(value, Tensor):
        return next(leaves)
    if isinstance(value, Mapping):
        items = {key: _rebuild(item, leaves) for key, item in value.items()}
        try:
            return type(value)(**items)
        except TypeError:
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_rebuild(item, leaves) for item in value))
    if isinstance(value, list | tuple):
        return type(value)(_rebuild(item, leaves) for item in value)
    return value


@dataclass
class OutputComparison:
    """Running statistics of onnxruntime's outputs against PyTorch's."""

    elements: int = 0
    absolute_sum: float = 0.0
    largest: float = 0.0
    value_sum: float = 0.0
    square_sum: float = 0.0

    def add(self, ours: np.ndarray, theirs: np.ndarray) -> None:
        ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
        difference = np.abs(theirs - ours)
        self.elements += ours.size
        self.absolute_sum += float(difference.sum())
        self.largest = max(self.largest, float(difference.max(initial=0.0)))
        self.value_sum += float(ours.sum())
        self.square_sum += float(np.square(ours).sum())

    @property
    def mean_difference(self) -> float:
        return self.absolute_sum / max(1, self.elements)

    @property
    def spread(self) -> float:
        """The standard deviation of PyTorch's output values."""
        if not self.elements:
            return 0.0
        mean = self.value_sum / self.elements
        return float(np.sqrt(max(0.0, self.square_sum / self.elements - mean * mean)))


class RuntimeModel(nn.Module):
    """The ONNX file as a module: a call runs the session on the call's tensors and returns
    its outputs in the structure of ``reference``'s output, which it also computes on the same
    inputs and compares (``comparison``); with ``keep`` the outputs are kept
    (``kept``: one (PyTorch, onnxruntime) pair of arrays per call)."""

    def __init__(self, path: Path, reference: nn.Module, *, keep: bool = False) -> None:
        super().__init__()
        self.session = onnx_session(path)
        self.__dict__["reference"] = reference  # not a submodule: its parameters stay its own
        self.register_buffer("_device", torch.zeros(()), persistent=False)
        self.comparison = OutputComparison()
        self.keep = keep
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = ModelInputs(args, kwargs)
        reference: nn.Module = self.__dict__["reference"]
        with torch.no_grad():
            expected = inputs.call(reference)
        ours = [t.detach().cpu().numpy() for t in output_leaves(expected)]
        theirs = self.session.run(None, inputs.feed(reference))
        if len(theirs) != len(ours):
            raise ExportError(
                f"the ONNX model returns {len(theirs)} outputs where the PyTorch model returns "
                f"{len(ours)} tensors"
            )
        for a, b in zip(ours, theirs, strict=True):
            self.comparison.add(a, np.asarray(b).reshape(a.shape))
        if self.keep:
            batch = len(ours[0]) if ours[0].ndim else 1
            self.kept.append((ours[0].reshape(batch, -1), np.asarray(theirs[0]).reshape(batch, -1)))
        return _rebuild(expected, iter(torch.from_numpy(np.asarray(t)) for t in theirs))
