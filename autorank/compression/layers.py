"""Layer discovery: which modules a plan may address, by their module names."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def is_candidate(module: nn.Module) -> bool:
    """Ordinary convolutions (groups=1) and linear layers can be decomposed and quantized."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module, nn.Linear)


def find_layers(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None,
                skip_first: bool = True) -> dict[str, nn.Module]:
    """Candidate layers by module name, in definition order.

    `include`/`exclude` are glob patterns on module names (fnmatch, e.g. "layer3.*"); the first conv
    is left out by default because it holds few parameters and decomposing it costs the most accuracy.
    """
    found = {name: m for name, m in model.named_modules() if name and is_candidate(m)}
    if skip_first:
        first_conv = next((name for name, m in found.items() if isinstance(m, nn.Conv2d)), None)
        found.pop(first_conv, None)
    if include:
        found = {n: m for n, m in found.items() if any(fnmatchcase(n, p) for p in include)}
    if exclude:
        found = {n: m for n, m in found.items() if not any(fnmatchcase(n, p) for p in exclude)}
    return found
