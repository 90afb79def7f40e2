"""What the conformance checks run on: the net, its batches, the cases and the build.

Public through :mod:`quantsearch.quantization.testing`; apart so that the checks and the suite
there stay one readable file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import Example, Quantizer
from ._registry import QUANTIZERS, missing_examples
from ._wrapper import QuantWrapper

__all__ = [
    "ConformanceCase",
    "ConformanceNet",
    "build",
    "conformance_cases",
    "example_batch",
    "expect",
    "make_net",
    "outputs_of",
    "wrappers",
]


class ConformanceNet(nn.Module):
    """Conv-BN-ReLU6, Conv-ReLU6, Linear: every layer kind the core treats differently.

    Input (N, 1, 8, 8), 5 classes. Declared examples refer to its layer names.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU6()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.flatten(x))


def make_net(seed: int = 0) -> ConformanceNet:
    """A ConformanceNet with weights seeded by ``seed``."""
    torch.manual_seed(seed)
    return ConformanceNet()


def example_batch(seed: int = 0, n: int = 16) -> tuple[Tensor, Tensor]:
    """Seeded inputs (n, 1, 8, 8) and labels 0..4."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    return x, torch.randint(0, 5, (n,), generator=generator)


@dataclass(frozen=True)
class ConformanceCase:
    """One declared example of one registered algorithm."""

    algorithm: str
    cls: type[Quantizer]
    example: Example

    def __str__(self) -> str:
        return f"{self.algorithm}-{self.example.id}"


def conformance_cases(
    registry: Mapping[str, type[Quantizer]] | None = None,
) -> list[ConformanceCase]:
    """Every example of every algorithm in ``registry`` (default: :data:`QUANTIZERS`).

    Raises ``TypeError`` naming the algorithm when one declares no examples: an algorithm is
    never silently left out of the suite.
    """
    registry = QUANTIZERS if registry is None else registry
    cases: list[ConformanceCase] = []
    for name, cls in registry.items():
        problem = missing_examples(cls)
        if problem is not None:
            raise TypeError(f"algorithm {name!r} cannot join the conformance suite: {problem}")
        cases.extend(ConformanceCase(name, cls, example) for example in cls.examples)
    return cases


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def build(
    case: ConformanceCase, *, seed: int = 0, train_steps: int = 5
) -> tuple[nn.Module, Quantizer]:
    """Compress a seeded ConformanceNet with the case's config_list and train it a few steps."""
    model = make_net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, _ = example_batch()
    quantizer = case.cls(model, case.example.config_list, optimizer, dummy_input=x[:1])
    model = quantizer.compress()
    model.train()
    for step in range(train_steps):
        xb, yb = example_batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    return model, quantizer


def wrappers(model: nn.Module) -> dict[str, QuantWrapper]:
    return {m.name: m for m in model.modules() if isinstance(m, QuantWrapper)}


def outputs_of(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    captured: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())
        )
        for name in names
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured
