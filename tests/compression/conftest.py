"""The digits CNN and its sensitivity table, shared by the sensitivity and allocator tests."""

from __future__ import annotations

import pytest
import torch

# small enough for a test (3 layers, 4 candidates each besides fp32), wide enough to allocate over
TABLE_OPTIONS = dict(include=["features.7", "features.10", "classifier"], methods=("tucker2", "svd"), levels=(0.5,),
                     precisions=("fp32", "int8", "int4"), decomposed_precisions=("int8", "int4"), limit=120, seed=0,
                     device="cpu", n_iter_max=20)


@pytest.fixture(scope="session")
def digits_cnn(digits):
    """The small CNN briefly trained on digits (seeded): a model whose layers a compression can hurt."""
    from autorank.engine import TrainConfig, train
    from autorank.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", digits)
    train(model, digits, TrainConfig(steps=60, batch_size=64, lr=0.05, schedule="onecycle", seed=0, device="cpu"))
    return model.eval()


@pytest.fixture(scope="session")
def digits_table(digits_cnn, digits):
    from autorank.engine import sensitivity_table

    return sensitivity_table(digits_cnn, digits, **TABLE_OPTIONS)
