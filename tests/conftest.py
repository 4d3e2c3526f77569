"""Shared fixtures: real data and checkpoints from ../shared, seeded and small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AUTORANK_SHARED", REPO.parent / "shared"))
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
CIFAR_MODELS = SHARED / "models" / "cifar10"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared() -> Path:
    if not CIFAR_ARCHIVE.exists():
        pytest.fail(f"../shared data missing at {SHARED}: set AUTORANK_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def cifar(shared):
    """The ../shared CIFAR-10 image folder as a Dataset; decoded once into the default cache."""
    from autorank.data import load_data

    return load_data(f"imagefolder:{CIFAR_ARCHIVE}")


@pytest.fixture(scope="session")
def digits():
    from autorank.data import load_data

    return load_data("digits")
