"""Shared fixtures: real data and checkpoints from ../shared, seeded and small."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AUTORANK_SHARED", REPO.parent / "shared"))
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
CIFAR_MODELS = SHARED / "models" / "cifar10"

if str(REPO) not in sys.path:  # tests import helpers as `tests.*`, and `module:tests.*:factory` models load in-process
    sys.path.insert(0, str(REPO))


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


def _train_checkpoint(name: str, data, folder: Path, steps: int) -> tuple[Path, float]:
    """Model `name` trained briefly from a seeded start and saved as {"state_dict": ...} in `folder`:
    the checkpoint a user would bring. Returns its path and validation accuracy."""
    from autorank.engine import TrainConfig, evaluate, train
    from autorank.models import create_model

    torch.manual_seed(0)
    model = create_model(name, data)
    train(model, data, TrainConfig(steps=steps, batch_size=64, lr=0.05, schedule="onecycle", seed=0))
    path = folder / f"{name.rpartition(':')[2]}.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, evaluate(model, data, "val")


@pytest.fixture(scope="session")
def train_checkpoint():
    """`train_checkpoint(name, data, folder, steps) -> (path, val accuracy)` (a fixture: conftest is not importable)."""
    return _train_checkpoint


@pytest.fixture(scope="session")
def digits():
    from autorank.data import load_data

    return load_data("digits")
