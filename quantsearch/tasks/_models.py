"""The built-in tasks' networks.

Every activation is its own module instance, so a quantizer can give each one its own output
quantization, and layers carry readable names (``conv1``, ``fc2``, ...).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CifarSmallCNN", "DigitsCNN", "MnistCNN", "VGG_Cifar10"]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm for the 8x8 digits, then a two-layer classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU6()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class MnistCNN(nn.Module):
    """The MNIST network of the QAT example: two 5x5 convolutions and two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5, stride=1)
        self.relu1 = nn.ReLU6()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, stride=1)
        self.relu2 = nn.ReLU6()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.relu3 = nn.ReLU6()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class VGG_Cifar10(nn.Module):
    """The VGG-like network of the BNN example on CIFAR-10 (Hubara et al. 2016).

    Module indices match the example's config_list: convolutions at features.0, .3, .7, .10,
    .14, .17; Hardtanh at features.2, .6, .9, .13, .16, .20; Linear at classifier.0, .3, .6;
    Hardtanh at classifier.2, .5. The output is a BatchNorm1d without affine parameters over
    the class scores: logits, trained with cross entropy.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, kernel_size=3, padding=1, bias=False),  # 0
            nn.BatchNorm2d(128, eps=1e-4),
            nn.Hardtanh(),  # 2
            nn.Conv2d(128, 128, kernel_size=3, padding=1, bias=False),  # 3
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.BatchNorm2d(128, eps=1e-4),
            nn.Hardtanh(),  # 6
            nn.Conv2d(128, 256, kernel_size=3, padding=1, bias=False),  # 7
            nn.BatchNorm2d(256, eps=1e-4),
            nn.Hardtanh(),  # 9
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),  # 10
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.BatchNorm2d(256, eps=1e-4),
            nn.Hardtanh(),  # 13
            nn.Conv2d(256, 512, kernel_size=3, padding=1, bias=False),  # 14
            nn.BatchNorm2d(512, eps=1e-4),
            nn.Hardtanh(),  # 16
            nn.Conv2d(512, 512, kernel_size=3, padding=1, bias=False),  # 17
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.BatchNorm2d(512, eps=1e-4),
            nn.Hardtanh(),  # 20
        )
        self.classifier = nn.Sequential(
            nn.Linear(512 * 4 * 4, 1024, bias=False),  # 0
            nn.BatchNorm1d(1024),
            nn.Hardtanh(),  # 2
            nn.Linear(1024, 1024, bias=False),  # 3
            nn.BatchNorm1d(1024),
            nn.Hardtanh(),  # 5
            nn.Linear(1024, num_classes),  # 6: stays float in the BNN config
            nn.BatchNorm1d(num_classes, affine=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class CifarSmallCNN(nn.Module):
    """A small CNN for CIFAR-10 that trains on a CPU: three conv blocks, two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU6()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU6()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU6()
        self.pool3 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(128 * 4 * 4, 128)
        self.relu4 = nn.ReLU6()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        return self.fc2(self.relu4(self.fc1(self.flatten(x))))
