"""`autorank compress` and `autorank ranks` end to end on sklearn digits (small, offline, real)."""

from __future__ import annotations

import json

import pytest
import torch

from autorank.cli import main
from autorank.compression import Plan, compress, profile
from autorank.data import load_data
from autorank.models import create_model

COMMON = ["--model", "small_cnn", "--data", "digits", "--device", "cpu", "--json"]


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """small_cnn briefly trained on digits, so accuracies mean something."""
    from autorank.engine import TrainConfig, train

    data = load_data("digits")
    torch.manual_seed(0)
    model = create_model("small_cnn", data)
    train(model, data, TrainConfig(steps=25, batch_size=64, lr=0.05, device="cpu"))
    path = tmp_path_factory.mktemp("ckpt") / "small_cnn-digits.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def test_compress_reports_and_saves_a_rebuildable_model(capsys, tmp_path, checkpoint):
    out = tmp_path / "run"
    result = run_json(capsys, ["compress", *COMMON, "--weights", str(checkpoint), "--method", "tucker2",
                               "--rank", "0.5", "--precision", "int8", "--activations", "int8",
                               "--calibration-images", "128", "--finetune-steps", "2", "--iters", "20", "--out", str(out)])
    before, after = result["before"], result["compressed"]
    assert before["accuracy"] > 0.5
    assert after["params"] < before["params"] and after["size_bytes"] < before["size_bytes"] / 4
    assert result["compression"]["size"] == pytest.approx(before["size_bytes"] / result["finetuned"]["size_bytes"])
    assert {lp["method"] for lp in result["plan"]["layers"].values()} == {"tucker2", "svd"}
    assert all(isinstance(lp["rank"], list) for lp in result["plan"]["layers"].values())

    # the saved plan + state_dict rebuild the same model without recomputing factors
    data = load_data("digits")
    model = create_model("small_cnn", data, checkpoint)
    rebuilt = compress(model, Plan.from_json((out / "plan.json").read_text()), decompose=False)
    rebuilt.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert profile(rebuilt, data.input_shape).size_bytes == result["finetuned"]["size_bytes"]
    from autorank.engine import evaluate
    assert evaluate(rebuilt, data, "val", device="cpu") == pytest.approx(result["finetuned"]["accuracy"])


def test_compress_with_a_plan_file_and_mixed(capsys, tmp_path, checkpoint):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"features.7": {"method": "cp", "rank": 12, "precision": "int4"}}}))
    result = run_json(capsys, ["compress", *COMMON, "--weights", str(checkpoint), "--plan", str(plan),
                               "--iters", "20"])
    assert result["plan"]["layers"]["features.7"] == {"method": "cp", "rank": [12], "precision": "int4",
                                                     "stabilize": "epc"}
    mixed = run_json(capsys, ["compress", *COMMON, "--weights", str(checkpoint), "--method", "mixed",
                              "--rank", "0.4", "--include", "features.[37]", "--iters", "15"])
    assert set(mixed["plan"]["layers"]) == {"features.3", "features.7"}
    assert {lp["method"] for lp in mixed["plan"]["layers"].values()} <= {"cp", "tucker2", "tt"}


def test_ranks_table(capsys, checkpoint):
    result = run_json(capsys, ["ranks", *COMMON, "--weights", str(checkpoint)])
    rows = {row["layer"]: row for row in result["layers"]}
    assert list(rows) == ["features.3", "features.7", "features.10", "classifier"]  # first conv skipped
    assert rows["features.10"]["shape"] == [64, 64, 3, 3]
    assert set(rows["features.10"]["ranks"]) == {"tucker2", "cp", "tt"} and set(rows["classifier"]["ranks"]) == {"svd"}
    assert sum(r["share"] for r in rows.values()) < 1.0
    assert main(["ranks", "--model", "small_cnn", "--data", "digits"]) == 0
    assert "EVBMF" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--rank", "half"], "--rank"),
    (["--rank", "vbmf:3"], "vbmf"),
    (["--plan", "missing.json"], "plan file not found"),
    (["--rank", "500"], "out of range"),
])
def test_user_mistakes_are_one_line_errors(capsys, argv, message):
    assert main(["compress", "--model", "small_cnn", "--data", "digits", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autorank: error:") and message in err and "\n" not in err
