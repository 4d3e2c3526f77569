"""Models that fail on purpose, for the failing-trial scenarios (`--model module:...:poisoned_cnn`).

The uncompressed model is healthy (the reference fine-tune must succeed); a trial fails only when
the search decomposes a poisoned layer: Tucker-2 on `body.inner` makes the loss NaN (a diverging
trial), SVD on `head.inner` raises (a crashing trial). Any other plan trains normally.
"""

from __future__ import annotations

from torch import Tensor, nn

NAN_LAYER = "body.inner"       # tucker2 here -> NaN loss
RAISE_LAYER = "head.inner"     # svd here -> RuntimeError
RAISE_MESSAGE = "simulated worker fault in a decomposed classifier"


class _NanIfDecomposed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return out * float("nan") if isinstance(self.inner, nn.Sequential) else out


class _RaiseIfDecomposed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.inner, nn.Sequential):
            raise RuntimeError(RAISE_MESSAGE)
        return self.inner(x)


class PoisonedCNN(nn.Module):
    """stem conv -> poisoned conv -> pool -> poisoned linear (a few thousand parameters)."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU())
        self.body = _NanIfDecomposed(nn.Conv2d(16, 32, 3, padding=1))
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = _RaiseIfDecomposed(nn.Linear(32, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.body(self.stem(x))))


def poisoned_cnn(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return PoisonedCNN(num_classes, input_shape[0])
