from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv-BN-ReLU6, Conv-ReLU6, Linear: every layer kind the core treats differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU6()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.flatten(x))


def make_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    return x, torch.randint(0, 5, (n,), generator=generator)


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(1)
