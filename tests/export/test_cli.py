"""`autorank export` on a real (tiny) search: the best trial end to end, and its one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from autorank.cli import main

SPACE = {
    "name": "export-tiny",
    "methods": ["none", "tucker2"],
    "precisions": ["int8"],
    "activations": ["int8"],
    "rank": {"multiplier": [2.0, 8.0]},
    "constraints": {"max_drop": 10.0},
    "finetune": {"steps": 5, "lr": 0.05, "batch_size": 64, "decompose_iters": 5},
    "search": {"trials": 2, "population": 2, "seed": 0, "evbmf_seeds": False},
}


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory, digits) -> Path:
    """A finished two-trial search on digits (small CNN pretrained here), with its MLflow store."""
    from autorank.engine import TrainConfig, train
    from autorank.models import create_model
    from autorank.search import run_search
    from autorank.tracking import MlflowCallback

    root = tmp_path_factory.mktemp("export-search")
    torch.manual_seed(0)
    model = create_model("small_cnn", digits)
    train(model, digits, TrainConfig(steps=80, batch_size=64, lr=0.05, schedule="onecycle", seed=0))
    weights = root / "small_cnn.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    run_search(space, "small_cnn", weights, "digits", root / "search", executor="local", progress=False,
               data=digits, callbacks=[MlflowCallback()])
    return root / "search"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_best_trial_is_verified_registered_and_described(search_dir, tmp_path, capsys):
    out = tmp_path / "best.onnx"
    code, stdout, _ = _run(capsys, "export", "--search", str(search_dir), "--max-drop", "10", "--precision", "int8",
                           "--out", str(out), "--threads", "1", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert out.is_file() and result["file_bytes"] == out.stat().st_size
    verification = result["verification"]
    assert verification["split"] == "test" and verification["images"] > 300
    assert verification["top1_agreement"] >= 0.97
    # the exported model is the model the search measured: same val accuracy within 3 images of 180
    assert abs(result["accuracy_gap"]) <= 100 * 3 / 180
    assert set(result["speed"]) == {"exported", "baseline"}
    assert all(s["latency_ms"] > 0 and s["throughput"] > 0 and s["threads"] == 1 for s in result["speed"].values())

    from mlflow import MlflowClient

    info = json.loads((search_dir / "search.json").read_text())
    client = MlflowClient(info["mlflow_uri"], registry_uri=info["mlflow_uri"])
    version = client.get_model_version(result["mlflow"]["name"], str(result["mlflow"]["version"]))
    assert version.run_id == result["mlflow"]["run_id"]
    assert version.tags["precision"] == "int8" and float(version.tags["top1_agreement"]) >= 0.97
    run = client.get_run(version.run_id)
    assert run.data.tags["autorank.trial"] == str(result["trial"])  # the trial's own run
    import mlflow.onnx
    import onnx

    mlflow.set_tracking_uri(info["mlflow_uri"])
    logged = mlflow.onnx.load_model(result["mlflow"]["model_uri"])
    assert logged.graph == onnx.load_model(out).graph  # the registry holds exactly the verified file

    card = Path(result["card"])
    assert card == tmp_path / "best.card.md"
    text = card.read_text()
    assert f"Trial {result['trial']}" in text and "top-1 agreement" in text and "sha256" in text
    # the verifying CPU and its int8 kernel, measured (issue 18): in --json and on the card
    host = result["host"]
    assert {"avx2", "avx512_vnni", "neon"} <= set(host["cpu_features"]) and host["int8_exact_on_every_cpu"]
    assert isinstance(host["int8_kernel_saturates_8bit_weights"], bool)
    assert "## Verifying host" in text and host["int8_kernel"] in text


def _one_line_error(code: int, stderr: str) -> str:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autorank: error: ")
    return lines[0]


def test_trial_not_in_search_or_without_weights(search_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    message = _one_line_error(*_run(capsys, "export", "--search", str(search_dir), "--trial", "99",
                                    "--out", str(out))[::2])
    assert "trial 99" in message
    copy = tmp_path / "copy"
    shutil.copytree(search_dir, copy)
    kept = sorted(p.parent.name for p in (copy / "trials").glob("*/model.pt"))
    (copy / "trials" / kept[0] / "model.pt").unlink()
    message = _one_line_error(*_run(capsys, "export", "--search", str(copy), "--trial", kept[0],
                                    "--out", str(out))[::2])
    assert f"trial {kept[0]} has no saved weights" in message
    assert not out.exists()


def test_empty_search_and_missing_folder(search_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    info = json.loads((search_dir / "search.json").read_text())
    info["storage"] = f"sqlite:///{empty / 'study.db'}"
    (empty / "search.json").write_text(json.dumps(info))
    optuna.create_study(study_name=info["study_name"], storage=info["storage"], directions=["maximize", "minimize"])
    message = _one_line_error(*_run(capsys, "export", "--search", str(empty), "--out", str(tmp_path / "m.onnx"))[::2])
    assert "no trials" in message
    message = _one_line_error(*_run(capsys, "export", "--search", str(tmp_path / "nowhere"),
                                    "--out", str(tmp_path / "m.onnx"))[::2])
    assert "holds no search" in message
