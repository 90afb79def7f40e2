"""MNIST with a network whose convolutions have enough channels for int8 kernels to pay off.

The latency-aware space (``search_spaces/latency.yaml``) uses it: the built-in MNIST CNN's 5x5
convolutions on 1 and 20 channels run slower in onnxruntime's int8 kernels than in its float
ones, so no quantization config of it is faster than float. This one (four 3x3 convolutions
with BatchNorm and ReLU, 32 to 128 channels, two of them strided, global pooling and one
Linear) runs 1.6 to 1.7 times as fast in int8 (W8A8, batch 64, one thread) on a CPU with AVX2
and no VNNI, as fast as onnxruntime's own ``quantize_static`` of it. Nearly all its time is in
the four convolutions; wider (64 to 256 channels), 1x1, max-pooled and Linear-headed variants
measured no better (docs/latency.md), so it stays this small: a study of it trains in minutes.
Data, splits and training are the built-in ``mnist`` task's::

    task: {name: ../examples/latency_task.py:make_task, data_dir: ../data/mnist}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from quantsearch.tasks import Task, get_task

__all__ = ["MnistConvNet", "make_task"]


class MnistConvNet(nn.Module):
    """28x28 -> 14x14 (32 channels) -> 14x14 (64) -> 7x7 (128) -> 7x7 (128) -> pool -> Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index, (inp, out, stride) in enumerate(
            ((1, 32, 2), (32, 64, 1), (64, 128, 2), (128, 128, 1)), start=1
        ):
            conv = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
            self.add_module(f"conv{index}", conv)
            self.add_module(f"bn{index}", nn.BatchNorm2d(out))
            self.add_module(f"relu{index}", nn.ReLU())
            layers.append(conv)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for index in range(1, 5):
            conv = getattr(self, f"conv{index}")
            bn = getattr(self, f"bn{index}")
            x = getattr(self, f"relu{index}")(bn(conv(x)))
        return self.fc(self.pool(x).flatten(1))


def make_task(data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """The built-in ``mnist`` task (same options) with :class:`MnistConvNet` as its model."""
    base = get_task("mnist", data_dir=data_dir, options=options, seed=seed)
    return dataclasses.replace(
        base,
        build_model=lambda: MnistConvNet(10),
        description=base.description.split(",")[0] + ", a 4-conv net (examples/latency_task.py)",
    )
