"""CIFAR ResNets of He et al. (2016) with "option A" shortcuts, matching akamaster's checkpoints.

The shortcut is a parameter-free module (subsample + zero-pad channels) so checkpoints load by
name, and compression finds only ordinary Conv2d/Linear layers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}

# Public checkpoints (akamaster/pytorch_resnet_cifar10, BSD-2-Clause), trained on official CIFAR-10.
CHECKPOINT_URLS = {
    name: f"https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{file}"
    for name, file in {
        "resnet20": "resnet20-12fca82f.th",
        "resnet32": "resnet32-d509ac18.th",
        "resnet44": "resnet44-014dd654.th",
        "resnet56": "resnet56-4bfd9763.th",
        "resnet110": "resnet110-1d1ed7c2.th",
    }.items()
}


class PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the channels by planes // 4 on each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem 3x3 conv (16) → three stages of n blocks (16/32/64 channels) → global pool → linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, stages = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(name: str, num_classes: int, in_channels: int) -> CifarResNet:
    return CifarResNet(DEPTHS[name], num_classes, in_channels)
