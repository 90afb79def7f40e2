"""Real MNIST for the benchmark networks: the built-in ``mnist`` task (same splits and
normalisation) with ResNet-18 or MobileNetV2 (``_networks.py``) reading the 28x28 images padded
to 32x32 with the blank pixel's value and repeated over 3 channels, as
``bench_ptq_methods.py`` trains them::

    task: {name: benchmarks/_mnist_networks_task.py:make_task,
           options: {network: mobilenetv2, pretrained: benchmarks/.cache/....pt}}
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from quantsearch.tasks import Task, TaskError, get_task

__all__ = ["make_task"]

_OPTIONS = {"network", "pretrained", "limit", "eval_limit"}


def _networks() -> Any:
    path = Path(__file__).with_name("_networks.py")
    spec = importlib.util.spec_from_file_location("_benchmark_networks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A blank MNIST pixel after the mnist task's normalisation (mean 0.1307, std 0.3081): the value
# bench_ptq_methods.py pads with (each batch's minimum), as a constant that exports to ONNX.
_BACKGROUND = -0.1307 / 0.3081


def _padded(base: type[nn.Module]) -> type[nn.Module]:
    class Padded(base):  # type: ignore[misc, valid-type]
        """The network on 28x28 single-channel images: padded to 32x32, three channels."""

        def forward(self, x: Tensor) -> Tensor:
            x = nn.functional.pad(x, (2, 2, 2, 2), value=_BACKGROUND)
            return super().forward(x.expand(-1, 3, -1, -1))

    Padded.__name__ = f"Mnist{base.__name__}"
    return Padded


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """``options``: ``network`` (resnet18 or mobilenetv2), ``pretrained`` (a state-dict file of
    that network), and the ``mnist`` task's ``limit`` / ``eval_limit``."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TaskError(f"unknown option(s) {unknown}; allowed: {sorted(_OPTIONS)}")
    classes = {"resnet18": "ResNet18", "mobilenetv2": "MobileNetV2"}
    network = options.get("network", "mobilenetv2")
    if network not in classes:
        raise TaskError(f"network {network!r}: expected one of {sorted(classes)}")
    model = _padded(getattr(_networks(), classes[network]))
    base = get_task(
        "mnist", data_dir=data_dir, seed=seed,
        options={k: options[k] for k in ("limit", "eval_limit") if k in options},
    )
    return dataclasses.replace(
        base,
        build_model=lambda: model(10),
        pretrained=options.get("pretrained"),
        description=f"MNIST padded to 32x32 over 3 channels, {classes[network]}",
    )
