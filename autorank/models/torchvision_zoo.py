"""torchvision's ImageNet architectures adapted to the data's channels, input size and classes.

For small inputs (side <= 64 px, e.g. CIFAR or 8x8 digits) the usual CIFAR adaptations apply:
a 3x3 stride-1 stem instead of 7x7/11x11 stride 2-4, no stem max-pool, any later pool that would
shrink the map below 1 px removed, and global average pooling before a single linear classifier.
"""

from __future__ import annotations

import math

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.googlenet import BasicConv2d

SMALL_INPUT = 64
TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50",
    "vgg11", "vgg16", "vgg19", "vgg11_bn", "vgg16_bn", "vgg19_bn",
    "googlenet", "alexnet",
)


def torchvision_model(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    channels, height, width = input_shape
    small = min(height, width) <= SMALL_INPUT
    if name.startswith("resnet"):
        return _resnet(name, num_classes, channels, small)
    if name.startswith("vgg"):
        return _vgg(name, num_classes, channels, (height, width), small)
    if name == "googlenet":
        return _googlenet(num_classes, channels, small)
    if name == "alexnet":
        return _alexnet(num_classes, channels, (height, width), small)
    raise KeyError(name)


def _resnet(name: str, num_classes: int, channels: int, small: bool) -> nn.Module:
    model = getattr(tvm, name)(weights=None, num_classes=num_classes)
    if small:
        model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def _first_conv(features: nn.Sequential) -> int:
    return next(i for i, m in enumerate(features) if isinstance(m, nn.Conv2d))


def _drop_underflowing_pools(features: nn.Sequential, size: tuple[int, int]) -> None:
    """Replace each max-pool that would shrink the feature map below 1x1 by an identity."""
    h, w = size
    for i, module in enumerate(features):
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = (module.kernel_size, module.stride, module.padding)
            k, s, p = (k if isinstance(k, tuple) else (k, k)), (s if isinstance(s, tuple) else (s, s)), (
                p if isinstance(p, tuple) else (p, p))
            ceil = isinstance(module, nn.MaxPool2d) and module.ceil_mode
            rnd = math.ceil if ceil else math.floor
            nh = rnd((h + 2 * p[0] - k[0]) / s[0]) + 1
            nw = rnd((w + 2 * p[1] - k[1]) / s[1]) + 1
            if isinstance(module, nn.MaxPool2d) and min(nh, nw) < 1:
                features[i] = nn.Identity()
                continue
            h, w = nh, nw


def _materialise(model: nn.Module) -> nn.Module:
    """Allocate a model built on the meta device and give every layer its default initialisation.

    VGG and AlexNet are built on `meta` because their ImageNet classifiers (up to 120M weights,
    seconds to initialise) are replaced for small inputs anyway.
    """
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # BatchNorm also resets its running statistics here
    return model


def _vgg(name: str, num_classes: int, channels: int, size: tuple[int, int], small: bool) -> nn.Module:
    with torch.device("meta"):
        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        first = _first_conv(model.features)
        if channels != 3:
            model.features[first] = nn.Conv2d(channels, model.features[first].out_channels, 3, padding=1)
        if small:
            _drop_underflowing_pools(model.features, size)
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = nn.Linear(512, num_classes)
    _materialise(model)
    for module in model.modules():  # torchvision's VGG initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return model


def _alexnet(num_classes: int, channels: int, size: tuple[int, int], small: bool) -> nn.Module:
    with torch.device("meta"):
        model = tvm.alexnet(weights=None, num_classes=num_classes)
        first = _first_conv(model.features)
        if small:
            model.features[first] = nn.Conv2d(channels, 64, 3, stride=1, padding=1)
            _drop_underflowing_pools(model.features, size)
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256, num_classes))
        elif channels != 3:
            model.features[first] = nn.Conv2d(channels, 64, 11, stride=4, padding=2)
    return _materialise(model)  # AlexNet uses PyTorch's default layer initialisation


def _googlenet(num_classes: int, channels: int, small: bool) -> nn.Module:
    model = tvm.googlenet(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)
    if small:
        model.conv1 = BasicConv2d(channels, 64, kernel_size=3, stride=1, padding=1)
        model.maxpool1 = nn.Identity()
        model.maxpool2 = nn.Identity()
    elif channels != 3:
        model.conv1 = BasicConv2d(channels, 64, kernel_size=7, stride=2, padding=3)
    return model
