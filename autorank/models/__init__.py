"""Model stage: `create_model(name, data, weights)` and `load_weights(model, source)`."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from autorank.data import Dataset
from autorank.errors import AutorankError
from autorank.models.checkpoints import load_weights
from autorank.models.cifar_resnet import DEPTHS, cifar_resnet
from autorank.models.small_cnn import SmallCNN
from autorank.models.torchvision_zoo import TORCHVISION_NAMES, torchvision_model

CIFAR_RESNET_NAMES = tuple(DEPTHS)
MODEL_NAMES: tuple[str, ...] = ("small_cnn", *CIFAR_RESNET_NAMES, *TORCHVISION_NAMES)

__all__ = ["MODEL_NAMES", "create_model", "load_weights"]


def check_model_name(name: str) -> None:
    """Reject an unknown model name early, before any data is loaded."""
    if name not in MODEL_NAMES and not name.startswith("module:"):
        raise AutorankError(f"unknown model {name!r}: choose from {', '.join(MODEL_NAMES)} or module:pkg.mod:factory")


def create_model(name: str, data: Dataset, weights: str | Path | None = None) -> nn.Module:
    """Build `name` for the data's channels, input size and class count; optionally load weights.

    Names: `small_cnn`, CIFAR `resnet20/32/44/56/110`, torchvision `resnet18/34/50`, `vgg11/16/19[_bn]`,
    `googlenet`, `alexnet`,
    or `module:pkg.mod:factory` where factory(num_classes=..., input_shape=...) returns an nn.Module (each
    argument passed only when the factory's signature takes it).
    """
    check_model_name(name)
    channels = data.input_shape[0]
    if name == "small_cnn":
        model: nn.Module = SmallCNN(data.num_classes, channels)
    elif name in CIFAR_RESNET_NAMES:
        model = cifar_resnet(name, data.num_classes, channels)
    elif name in TORCHVISION_NAMES:
        model = torchvision_model(name, data.num_classes, data.input_shape)
    else:
        model = _user_model(name, data)
    if weights is not None:
        load_weights(model, weights)
    return model


def _user_model(name: str, data: Dataset) -> nn.Module:
    target = name.removeprefix("module:")
    module_name, _, factory_name = target.rpartition(":")
    if not module_name or not factory_name:
        raise AutorankError(f"bad model {name!r}: expected module:pkg.mod:factory")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise AutorankError(f"cannot import {target}: {exc}") from None
    if not callable(factory):
        raise AutorankError(f"{target} is not callable: expected a factory returning an nn.Module")
    kwargs = _factory_kwargs(factory, target, {"num_classes": data.num_classes, "input_shape": data.input_shape})
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise AutorankError(f"{target}({', '.join(f'{k}=...' for k in kwargs)}) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise AutorankError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _factory_kwargs(factory: Callable[..., Any], target: str, offered: dict[str, Any]) -> dict[str, Any]:
    """The offered keyword arguments that `factory` accepts: most factories take only num_classes.

    A factory with **kwargs (or no inspectable signature) gets them all; one that requires another
    argument is refused before it is called."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return offered
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return offered
    keyword = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
               and p.name not in offered.keys() & keyword]
    if missing:
        raise AutorankError(f"{target} requires {', '.join(missing)}: autorank passes only "
                            f"{', '.join(offered)} (by keyword, those the factory accepts)")
    return {k: v for k, v in offered.items() if k in keyword}
