"""A pretrained digits CNN and a tiny search space shared by the search tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_SPACE = {
    "name": "tiny",
    "methods": ["none", "tucker2", "tt", "svd"],
    "precisions": ["fp32", "int8"],
    "rank": {"multiplier": [0.5, 12.0]},
    "constraints": {"max_drop": 5.0},
    "finetune": {"steps": 8, "lr": 0.05, "batch_size": 64, "decompose_iters": 5},
    # NSGA-II pinned: these tests check recording and resuming on a known sequence of trials (all six
    # finish); the default sampler (TPE) proposes a trial that diverges at lr 0.05 on this tiny space.
    "search": {"sampler": "nsga2", "trials": 6, "population": 4, "seed": 0},
}


@pytest.fixture(scope="session")
def pretrained_digits(tmp_path_factory, digits, train_checkpoint) -> Path:
    """The small CNN trained on digits (>= 0.95 val): the model a user would bring."""
    path, accuracy = train_checkpoint("small_cnn", digits, tmp_path_factory.mktemp("pretrained"), steps=150)
    assert accuracy >= 0.95
    return path


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    return path
