"""A user's own CNN, as `--model module:tests.user_models:mixed_cnn` brings it (issue #17).

It has what zoo models lack: a depthwise conv (never decomposed), a dilated conv with a bias,
strided convs, a two-branch concatenation, BatchNorm, and a two-layer MLP head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


class MixedCNN(nn.Module):
    """stem -> depthwise -> pointwise -> strided -> [dilated+bias | strided 1x1] concat -> MLP."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), *_bn_relu(16))
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), *_bn_relu(16))
        self.pointwise = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), *_bn_relu(32))
        self.down = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), *_bn_relu(32))
        self.dilated = nn.Conv2d(32, 24, 3, padding=2, dilation=2, bias=True)
        self.shortcut = nn.Conv2d(32, 24, 1, bias=False)
        self.merge = _bn_relu(48)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(self.pointwise(self.depthwise(self.stem(x))))
        x = self.merge(torch.cat([self.dilated(x), self.shortcut(x)], dim=1))
        return self.head(self.pool(x))


def mixed_cnn(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return MixedCNN(num_classes, input_shape[0])
