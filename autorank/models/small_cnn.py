"""A small CNN that fits the 8x8 digits in seconds on CPU and adapts to any input size."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv32 → conv32 → pool → conv64 → conv64 → global pool → linear (~67k params)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 32), *_conv_bn(32, 32), nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn(32, 64), *_conv_bn(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
