"""`run_demo(out_dir)`: the whole pipeline on the built-in default, small enough for 2 CPU cores.

Trains the small CNN on sklearn's digits (the "pretrained model" a user would bring), then runs the
search in the shipped `default` space (search_spaces/default.yaml, about 20 trials). Later stages extend the demo by calling
`run_demo` and continuing from its `SearchResult` (e.g. exporting `result.best`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from autorank.data import load_data
from autorank.engine import TrainConfig, evaluate, train
from autorank.models import create_model
from autorank.search.run import Callback, SearchResult, run_search
from autorank.search.space import load_space

DEFAULT_SPACE = "default"  # a shipped space's name: the demo runs wherever autorank is installed
PRETRAIN = TrainConfig(steps=150, batch_size=64, lr=0.05, schedule="onecycle", seed=0)


def run_demo(out_dir: str | Path, *, trials: int | None = None, progress: bool = True,
             space: str | Path = DEFAULT_SPACE, callbacks: Sequence[Callback] = ()) -> SearchResult:
    """Pretrain the digits CNN into OUT/pretrained.pt, then search into OUT (a new folder), telling
    `callbacks` (as `run_search`; the CLI's demo attaches the MLflow tracker)."""
    out = Path(out_dir)
    space_ = load_space(space)
    data = load_data("digits", seed=space_.seed)
    torch.manual_seed(space_.seed)  # the CNN's initialisation: the same demo gives the same search
    model = create_model("small_cnn", data)
    if progress:
        print("autorank demo: training the small CNN on digits (the model to compress)", file=sys.stderr)
    train(model, data, PRETRAIN)
    accuracy = evaluate(model, data, "val")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "pretrained.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    if progress:
        print(f"autorank demo: pretrained val accuracy {accuracy * 100:.2f}%; searching", file=sys.stderr)
    return run_search(space_, "small_cnn", weights, "digits", out, trials=trials, data=data, progress=progress,
                      callbacks=callbacks)
