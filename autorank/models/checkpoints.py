"""Checkpoint loading: local path, URL, or a known model name; always `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from autorank.errors import AutorankError

SHOWN_KEYS = 4


def resolve_source(source: str | Path) -> str | Path:
    """A known CIFAR ResNet name (e.g. `resnet20`) stands for its public checkpoint URL."""
    from autorank.models.cifar_resnet import CHECKPOINT_URLS

    return CHECKPOINT_URLS.get(str(source), source)


def check_weights_source(source: str | Path) -> None:
    """Reject a local checkpoint path that does not exist, before any data is loaded."""
    text = str(resolve_source(source))
    if not text.startswith(("http://", "https://")) and not Path(text).expanduser().is_file():
        raise AutorankError(f"weights file not found: {text}")


def read_state_dict(source: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint, unwrapped from `{"state_dict": ...}` and stripped of `module.`."""
    source = resolve_source(source)
    text = str(source)
    if text.startswith(("http://", "https://")):
        from autorank.data.sources import default_cache_dir

        try:
            loaded = torch.hub.load_state_dict_from_url(
                text, model_dir=str(default_cache_dir() / "checkpoints"), map_location="cpu",
                progress=False, weights_only=True,
            )
        except Exception as exc:  # offline, 404, corrupt download
            raise AutorankError(f"cannot download weights {text}: {type(exc).__name__}: {exc}") from None
    else:
        check_weights_source(text)
        path = Path(text).expanduser()
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AutorankError(f"cannot load weights {path}: {first_line}") from None
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise AutorankError(f"{text} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _listing(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS]) + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")
    return f"{label} {len(keys)}: {shown}"


def load_weights(model: nn.Module, source: str | Path) -> nn.Module:
    """Load a checkpoint strictly; a mismatch names the missing, unexpected and mis-shaped keys."""
    state = read_state_dict(source)
    expected = model.state_dict()
    # checkpoints older than PyTorch 0.4.1 lack BatchNorm's counter; BatchNorm fills it in itself
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)}!={tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = [
        _listing(label, keys)
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped))
        if keys
    ]
    if problems:
        raise AutorankError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model
