"""The in-memory dataset every stage trains and evaluates on.

Images stay decoded as uint8 tensors (4x smaller than float32, and the cache format); each batch is
normalised and augmented as a whole tensor on the target device, so the training loop never runs
per-sample Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from autorank.errors import AutorankError

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Decoded splits plus what is needed to feed them to a model."""

    name: str
    classes: list[str]
    splits: dict[str, tuple[Tensor, Tensor]]  # split -> (uint8 N×C×H×W, int64 N)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop (with padding) + horizontal flip suits this data during training

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        images = next(iter(self.splits.values()))[0]
        return tuple(images.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The (images, labels) of one split; a clear error for an unknown name."""
        if name not in self.splits:
            raise AutorankError(f"unknown split {name!r} for {self.name}: choose from {', '.join(self.splits)}")
        return self.splits[name]

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        limit: int | None = None,
        channels_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield normalised float32 image batches and int64 labels on `device`.

        `limit` caps the number of images (the first `limit`, or a random `limit` when shuffling; for a
        class-balanced subset, iterate over `sample(split, limit)` instead);
        `augment` applies random crop with zero padding and horizontal flip to each whole batch.
        """
        images, labels = self.split(split)
        count = len(labels) if limit is None else min(int(limit), len(labels))
        order = torch.randperm(len(labels), generator=generator)[:count] if shuffle else torch.arange(count)
        device = torch.device(device)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        if augment:  # one seeded stream for crop offsets and flips, independent of the device
            aug_generator = torch.Generator().manual_seed(
                int(torch.randint(2**62, (1,), generator=generator).item())
            )
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            x = images[index].to(device, non_blocking=True)
            y = labels[index].to(device, non_blocking=True)
            if augment:
                x = augment_batch(x, aug_generator)
            x = (x.float().div_(255.0) - mean).mul_(inv_std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


    def sample(self, split: str, limit: int | None, *, seed: int = 0) -> Dataset:
        """This data with only `split`, cut to a seeded sample of `limit` images with every class in
        proportion (`stratified_indices`); all of the split when `limit` is None or not smaller.

        What every `limit` means (evaluate, compress --limit, the sensitivity table, export
        verification): the first N images of a class-ordered image folder would be one or two classes."""
        images, labels = self.split(split)
        if limit is not None and limit < len(labels):
            index = stratified_indices(labels, limit, seed)
            images, labels = images[index], labels[index]
        return replace(self, splits={split: (images, labels)})

    def calibration_images(self, count: int, batch_size: int, *, seed: int = 0,
                           device: str | torch.device = "cpu") -> list[Tensor]:
        """A seeded random sample of normalised training images, in batches, for quantization ranges.

        Random, not the first `count`: image-folder splits are ordered by class, so the first images
        would all be one class and the calibrated ranges would fit only it."""
        generator = torch.Generator().manual_seed(seed)
        return [x for x, _ in self.batches("train", batch_size, shuffle=True, generator=generator,
                                           limit=count, device=device)]


def stratified_indices(labels: Tensor, count: int, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded random subset of `count` labels with every class in proportion to
    its share (largest remainders round). Image folders are ordered by class: never take the first N."""
    n = len(labels)
    if count >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * count / n
    quota = exact.floor().long()
    extra = count - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:extra]] += 1
    picked = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.sort(torch.cat(picked)).values


def augment_batch(images: Tensor, generator: torch.Generator, padding: int | None = None) -> Tensor:
    """Random crop with zero padding (default 1/8 of the side, 4 px at 32 px) and horizontal flip.

    Vectorised over the batch: one padded copy, then a gather of per-image row/column windows.
    """
    n, _, h, w = images.shape
    pad = max(1, min(h, w) // 8) if padding is None else padding
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    rows = dy[:, None] + torch.arange(h, device=device)  # n×h
    cols = dx[:, None] + torch.arange(w, device=device)  # n×w
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is a reversed column window
    batch = torch.arange(n, device=device)[:, None, None]
    # advanced indices split by the channel slice put their dims first: n×h×w×C
    cropped = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()
