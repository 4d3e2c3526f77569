"""Does the ONNX file compute what PyTorch computed? Same inputs through both, compared."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autorank.data import Dataset
from autorank.engine.deploy import INPUT_NAME, onnx_session


@dataclass
class Verification:
    """ONNX Runtime against the PyTorch model on one split's images (the same seeded sample)."""

    split: str
    images: int
    onnx_accuracy: float
    torch_accuracy: float
    top1_agreement: float   # fraction of images where both predict the same class
    max_abs_error: float    # largest |logit difference| over all images and classes

    def to_dict(self) -> dict:
        return asdict(self)


def sample_batches(data: Dataset, split: str, *, limit: int | None, seed: int, batch_size: int = 256):
    """Batches of a seeded stratified sample of `limit` images (all when None; `Dataset.sample`)."""
    return data.sample(split, limit, seed=seed).batches(split, batch_size)


def onnx_accuracy(path: str | Path, data: Dataset, split: str, *, limit: int | None = None, seed: int = 0,
                  threads: int | None = None) -> float:
    """Top-1 accuracy of the ONNX model on a split (or a seeded sample of it)."""
    session = onnx_session(path, threads)
    correct = total = 0
    for x, y in sample_batches(data, split, limit=limit, seed=seed):
        logits = session.run(None, {INPUT_NAME: x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def verify(path: str | Path, model: nn.Module, data: Dataset, split: str = "test", *, limit: int | None = None,
           seed: int = 0, threads: int | None = None) -> Verification:
    """Run the ONNX file and `model` (eval mode, CPU, fp32; fake quantization active) side by side."""
    session = onnx_session(path, threads)
    model = model.eval().cpu()
    images = onnx_correct = torch_correct = agree = 0
    max_error = 0.0
    for x, y in sample_batches(data, split, limit=limit, seed=seed):
        onnx_logits = session.run(None, {INPUT_NAME: x.numpy()})[0]
        torch_logits = model(x).float().numpy()
        onnx_top, torch_top, labels = onnx_logits.argmax(1), torch_logits.argmax(1), y.numpy()
        images += len(labels)
        onnx_correct += int((onnx_top == labels).sum())
        torch_correct += int((torch_top == labels).sum())
        agree += int((onnx_top == torch_top).sum())
        max_error = max(max_error, float(np.abs(onnx_logits.astype(np.float32) - torch_logits).max()))
    if images == 0:
        raise ValueError(f"split {split!r} of {data.name} is empty: nothing to verify on")
    return Verification(split, images, onnx_correct / images, torch_correct / images, agree / images, max_error)
