"""Issue #17: a user's own CNN (tests/user_models.py) through the whole CLI, as a new user runs it.

ranks -> search -> best -> export --precision int8 registered in the search's MLflow, on digits;
then the export's failure modes: a bad --registered-name before any work, an unreachable tracking
server after a verified export (one line, exit 1, the file and card kept).
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import yaml

from autorank.cli import main
from autorank.compression.ranks import method_params

MODEL = "module:tests.user_models:mixed_cnn"
# Tucker-2/SVD on every layer where that shrinks it, at int8 weights and activations (what the export
# must reproduce), so the exported trial holds decomposed strided and dilated convs. No accuracy
# limit: this is about the pipeline; the best trial is the most accurate one.
SPACE = {
    "name": "user-model",
    "methods": ["tucker2", "svd"],
    "precisions": ["int8"],
    "activations": ["int8"],
    "rank": {"multiplier": [2.5, 5.0]},
    "finetune": {"steps": 8, "lr": 0.02, "batch_size": 64, "decompose_iters": 5},
    "search": {"trials": 3, "population": 3, "seed": 0},
}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def user_weights(tmp_path_factory, digits, train_checkpoint) -> Path:
    """The user's CNN trained briefly on digits: the checkpoint they bring."""
    path, accuracy = train_checkpoint(MODEL, digits, tmp_path_factory.mktemp("user"), steps=120)
    assert accuracy >= 0.9
    return path


@pytest.fixture(scope="module")
def user_search(tmp_path_factory, user_weights) -> Path:
    root = tmp_path_factory.mktemp("user-search")
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert main(["search", "--config", str(space), "--model", MODEL, "--weights", str(user_weights),
                 "--data", "digits", "--out", str(root / "search"), "--no-progress"]) == 0
    return root / "search"


def test_ranks_search_best_export_and_registry(user_weights, user_search, tmp_path, capsys):
    code, out, _ = _run(capsys, "ranks", "--model", MODEL, "--weights", str(user_weights), "--data", "digits",
                        "--json")
    assert code == 0
    rows = {row["layer"]: row for row in json.loads(out)["layers"]}
    # the depthwise conv is no candidate; the dilated conv with bias, strided convs and the MLP head are
    assert list(rows) == ["pointwise.0", "down.0", "dilated", "shortcut", "head.0", "head.2"]
    shape = tuple(rows["pointwise.0"]["shape"])
    tucker = rows["pointwise.0"]["ranks"]["tucker2"]
    assert tucker == [16, 16] and method_params("tucker2", shape, tucker) > math.prod(shape)  # EVBMF: full rank
    code, out, _ = _run(capsys, "compress", "--model", MODEL, "--weights", str(user_weights), "--data", "digits",
                        "--method", "tucker2", "--rank", "vbmf", "--precision", "int8", "--json")
    assert code == 0
    compressed = json.loads(out.strip().splitlines()[-1])
    left = {name for name, lp in compressed["plan"]["layers"].items() if lp["method"] == "none"}
    assert "pointwise.0" in left and set(compressed["undecomposed"]) == left  # each with its reason
    assert compressed["undecomposed"]["pointwise.0"] == \
        "tucker2 at ranks 16x16 would hold 1,024 weights, the layer holds 512"
    assert all(lp["precision"] == "int8" for lp in compressed["plan"]["layers"].values())

    info = json.loads((user_search / "search.json").read_text())
    from autorank.search import load_search

    trials = load_search(user_search).trials
    assert [t.state for t in trials] == ["complete"] * 3
    for trial in trials:  # a layer is decomposed only where that shrinks it: never the 1x1 pointwise conv
        layers = trial.plan["layers"]
        assert layers["pointwise.0"] == {"method": "none", "rank": None, "precision": "int8", "stabilize": "epc"}
        assert layers["dilated"]["method"] == "tucker2" and layers["down.0"]["method"] == "tucker2"
        for name, lp in layers.items():
            if lp["method"] != "none":
                assert method_params(lp["method"], tuple(info["layers"][name]["shape"]), lp["rank"]) \
                    < math.prod(info["layers"][name]["shape"])

    code, out, _ = _run(capsys, "best", "--search", str(user_search), "--json")
    assert code == 0
    best = json.loads(out)["trial"]
    onnx_file = tmp_path / "user.onnx"
    code, out, err = _run(capsys, "export", "--search", str(user_search), "--precision", "int8", "--out",
                          str(onnx_file), "--threads", "1", "--no-bench", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["trial"] == best and onnx_file.is_file()
    assert result["verification"]["top1_agreement"] >= 0.99 and result["verification"]["images"] > 300
    assert result["file_bytes"] < info["reference"]["size_bytes"] / 2  # int8 and decomposed: well under fp32

    from mlflow import MlflowClient

    registered = result["mlflow"]
    assert registered["name"] == "autorank-mixed_cnn" and registered["tracking_uri"] == info["mlflow_uri"]
    version = MlflowClient(info["mlflow_uri"], registry_uri=info["mlflow_uri"]).get_model_version(
        registered["name"], str(registered["version"]))
    assert version.run_id == registered["run_id"] and version.tags["trial"] == str(best)
    assert float(version.tags["top1_agreement"]) >= 0.99


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_export_failures_are_one_line_and_keep_the_verified_file(user_search, tmp_path, capsys, monkeypatch):
    onnx_file = tmp_path / "user.onnx"
    export = ["export", "--search", str(user_search), "--precision", "int8", "--out", str(onnx_file),
              "--threads", "1", "--no-bench", "--verify-limit", "64"]
    code, _, err = _run(capsys, *export, "--registered-name", "team/mixed:v1")
    assert code == 2 and err.count("\n") == 1 and err.startswith("autorank: error: registered model name")
    assert not onnx_file.exists()  # checked before any work

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    unreachable = f"http://127.0.0.1:{_closed_port()}"
    code, out, err = _run(capsys, *export, "--mlflow-uri", unreachable)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("autorank: error: ")
    assert "written and verified" in err and unreachable in err and "--no-register" in err
    assert "ConnectionRefusedError" in err
    assert onnx_file.is_file() and onnx_file.with_suffix(".card.md").is_file()
