"""MNIST with networks that onnxruntime's int8 kernels run faster than float.

The latency-aware spaces use them; data, splits and training are the built-in ``mnist``
task's (same options)::

    task: {name: ../examples/latency_task.py:make_task, data_dir: ../data/mnist}

* :class:`MnistMLP` (``make_task``, ``search_spaces/latency.yaml``): three hidden Linear layers
  of 2048 units. At batch 1 each Linear is a matrix-vector product whose time is spent reading
  the weight, and int8 weights are a quarter of float's bytes: its W8A8 export runs about 3x as
  fast as float on one thread of an AVX2 CPU without VNNI (docs/latency.md).
* :class:`MnistConvNet` (``make_conv_task``, ``search_spaces/latency_cnn.yaml``): four 3x3
  convolutions of 32 to 128 channels. Convolutions are bound by arithmetic, where that CPU's
  int8 kernels are at most about twice as fast as float: 1.6 to 1.7x at batch 64. (The
  built-in MNIST CNN's 5x5 convolutions on 1 and 20 channels run slower in int8 than in float.)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from quantsearch.tasks import Task, get_task

__all__ = ["MnistConvNet", "MnistMLP", "make_conv_task", "make_task"]


class MnistMLP(nn.Sequential):
    """784 -> 2048 -> 2048 -> 2048 -> 10 (``fc1`` to ``fc4``), ReLUs between (``relu1`` to 3)."""

    def __init__(self, num_classes: int = 10, width: int = 2048) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        sizes = (28 * 28, width, width, width)
        for index, (inp, out) in enumerate(itertools.pairwise(sizes), start=1):
            layers[f"fc{index}"] = nn.Linear(inp, out)
            layers[f"relu{index}"] = nn.ReLU()
        layers["fc4"] = nn.Linear(width, num_classes)
        super().__init__(layers)


class MnistConvNet(nn.Module):
    """28x28 -> 14x14 (32 channels) -> 14x14 (64) -> 7x7 (128) -> 7x7 (128) -> pool -> Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        for index, (inp, out, stride) in enumerate(
            ((1, 32, 2), (32, 64, 1), (64, 128, 2), (128, 128, 1)), start=1
        ):
            self.add_module(f"conv{index}", nn.Conv2d(inp, out, 3, stride, 1, bias=False))
            self.add_module(f"bn{index}", nn.BatchNorm2d(out))
            self.add_module(f"relu{index}", nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for index in range(1, 5):
            conv = getattr(self, f"conv{index}")
            bn = getattr(self, f"bn{index}")
            x = getattr(self, f"relu{index}")(bn(conv(x)))
        return self.fc(self.pool(x).flatten(1))


def _mnist_with(
    build: Callable[[], nn.Module], what: str, data_dir: Path | None, options: dict[str, Any],
    seed: int,
) -> Task:
    base = get_task("mnist", data_dir=data_dir, options=options, seed=seed)
    description = f"{base.description.split(',')[0]}, {what} (examples/latency_task.py)"
    return dataclasses.replace(base, build_model=build, description=description)


def make_task(data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """The built-in ``mnist`` task (same options) with :class:`MnistMLP` as its model."""
    return _mnist_with(lambda: MnistMLP(10), "a 3x2048 MLP", data_dir, options, seed)


def make_conv_task(data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """The built-in ``mnist`` task (same options) with :class:`MnistConvNet` as its model."""
    return _mnist_with(lambda: MnistConvNet(10), "a 4-conv net", data_dir, options, seed)
