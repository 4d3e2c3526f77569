"""A pretrained digits CNN and a tiny search space shared by the search tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

TINY_SPACE = {
    "name": "tiny",
    "methods": ["none", "tucker2", "tt", "svd"],
    "precisions": ["fp32", "int8"],
    "rank": {"multiplier": [0.5, 12.0]},
    "constraints": {"max_drop": 5.0},
    "finetune": {"steps": 8, "lr": 0.05, "batch_size": 64, "decompose_iters": 5},
    "search": {"trials": 6, "population": 4, "seed": 0},
}


@pytest.fixture(scope="session")
def pretrained_digits(tmp_path_factory, digits) -> Path:
    """The small CNN trained on digits (>= 0.95 val): the model a user would bring."""
    from autorank.engine import TrainConfig, evaluate, train
    from autorank.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", digits)
    train(model, digits, TrainConfig(steps=150, batch_size=64, lr=0.05, schedule="onecycle", seed=0))
    assert evaluate(model, digits, "val") >= 0.95
    path = tmp_path_factory.mktemp("pretrained") / "small_cnn.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    return path
