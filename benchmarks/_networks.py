"""CIFAR-style ResNet-18 and MobileNetV2 (32x32 inputs) for the benchmarks.

Written the way torchvision's quantizable models are: one activation module per use (not
in place), the residual add through ``FloatFunctional`` (an identity in float training) and a
``QuantStub``/``DeQuantStub`` pair at the ends, so torch.ao's eager-mode QAT can prepare the
very same modules. ``fuse_groups`` lists the conv-bn(-relu) groups a torch.ao user fuses.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

__all__ = ["MobileNetV2", "ResNet18", "fuse_groups"]


class BasicBlock(nn.Module):
    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )
        self.add = FloatFunctional()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add.add(y, self.shortcut(x)))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stem without max pooling, four stages of two
    BasicBlocks (64, 128, 256, 512 channels), global average pooling, one Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        inp = 64
        for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(inp, out, stride), BasicBlock(out, out, 1)]
            inp = out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(self.quant(x)))))
        return self.dequant(self.fc(self.pool(x).flatten(1)))


class ConvBNReLU6(nn.Sequential):
    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(inp, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out
        self.add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        return self.add.add(x, self.conv(x)) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs: stride 1 in the stem and in the 24-channel
    stage (instead of 2), so the feature maps end at 4x4; 17 inverted residual blocks, a
    1x1 conv to 1280 channels, global average pooling, one Linear."""

    # (expansion, output channels, blocks, first stride)
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.quant = QuantStub()
        features: list[nn.Module] = [ConvBNReLU6(3, 32, 3, 1)]
        inp = 32
        for expand, out, blocks, stride in self.CONFIG:
            for index in range(blocks):
                features.append(InvertedResidual(inp, out, stride if index == 0 else 1, expand))
                inp = out
        features.append(ConvBNReLU6(inp, 1280, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.quant(x))
        return self.dequant(self.classifier(self.pool(x).flatten(1)))


def fuse_groups(model: nn.Module) -> list[list[str]]:
    """The conv-bn(-relu) groups of ``model``, by qualified name, as a torch.ao user passes
    them to ``fuse_modules_qat``: a Conv2d, the BatchNorm2d registered right after it and a
    ReLU right after that. torch.ao has no conv-bn-ReLU6 fusion, so a ReLU6 stays a module of
    its own (torchvision's quantizable MobileNetV2 swaps it for a ReLU, changing the model)."""
    groups: list[list[str]] = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children[:-1]):
            if type(child) is not nn.Conv2d or type(children[index + 1][1]) is not nn.BatchNorm2d:
                continue
            group = [prefix + name, prefix + children[index + 1][0]]
            if index + 2 < len(children) and type(children[index + 2][1]) is nn.ReLU:
                group.append(prefix + children[index + 2][0])
            groups.append(group)
    return groups
