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
    layers = result["plan"]["layers"]  # a ratio leaves the classifier whole (make_plan), at its precision
    assert layers.pop("classifier") == {"method": "none", "rank": None, "precision": "int8", "stabilize": "epc"}
    assert {lp["method"] for lp in layers.values()} == {"tucker2"}
    assert all(isinstance(lp["rank"], list) for lp in layers.values())

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


@pytest.mark.parametrize("method,rank,ranks,weights", [("tucker2", "32,64", "32x64", "23,552"),
                                                       ("cp", "1.0", "181", "18,462")])
def test_a_layer_that_would_not_shrink_stays_whole_at_its_precision(capsys, checkpoint, method, rank, ranks, weights):
    """Integers and ratios as EVBMF ranks: no chain larger than the 64x32x3x3 conv (18,432 weights) is built."""
    argv = ["compress", "--model", "small_cnn", "--data", "digits", "--device", "cpu", "--weights", str(checkpoint),
            "--method", method, "--rank", rank, "--precision", "int8", "--include", "features.7"]
    result = run_json(capsys, [*argv, "--json"])
    assert result["plan"]["layers"] == {"features.7": {"method": "none", "rank": None, "precision": "int8",
                                                       "stabilize": "epc"}}
    assert result["undecomposed"] == {
        "features.7": f"{method} at ranks {ranks} would hold {weights} weights, the layer holds 18,432"}
    assert result["compressed"]["params"] == result["before"]["params"]
    assert result["compressed"]["size_bytes"] < result["before"]["size_bytes"]  # its int8 weights still apply
    assert main(argv) == 0
    assert f"left undecomposed: features.7 ({method} at ranks" in capsys.readouterr().out


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
    (["--distill", "1.5"], "distillation weight"),
    (["--target-ratio", "0"], "--target-ratio"),
])
def test_user_mistakes_are_one_line_errors(capsys, argv, message):
    assert main(["compress", "--model", "small_cnn", "--data", "digits", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autorank: error:") and message in err and "\n" not in err


def test_target_ratio_allocates_from_a_sensitivity_table_and_reuses_it(capsys, tmp_path, checkpoint):
    table = tmp_path / "sensitivity.json"
    text = ["compress", "--model", "small_cnn", "--data", "digits", "--device", "cpu", "--weights", str(checkpoint),
            "--target-ratio", "3", "--sensitivity", str(table), "--iters", "10", "--calibration-images", "64"]
    argv = [*text, "--include", "features.1*", "--include", "features.7", "--sensitivity-images", "60", "--json"]
    result = run_json(capsys, argv)
    allocation, after = result["allocation"], result["compressed"]
    assert after["size_bytes"] == allocation["predicted_size_bytes"] <= allocation["budget_bytes"]
    assert result["compression"]["size"] >= 3 and allocation["sensitivity_images"] == 60
    assert set(result["plan"]["layers"]) == {"features.7", "features.10"}
    assert table.is_file() and allocation["predicted_drop_points"] >= 0
    again = run_json(capsys, argv)  # the saved table: same plan, no new measurements
    assert again["plan"] == result["plan"] and again["allocation"] == allocation
    assert main(argv[:-1]) == 0
    assert "allocated for x3" in capsys.readouterr().out
    assert main(text) == 2  # the table was measured for two layers, not all four
    assert "measured for other layers" in capsys.readouterr().err


def test_limit_measures_a_stratified_sample_of_the_split(capsys, checkpoint):
    result = run_json(capsys, ["compress", *COMMON, "--weights", str(checkpoint), "--method", "none",
                               "--limit", "60", "--seed", "2"])
    from autorank.engine import evaluate

    data = load_data("digits", seed=2)
    sample = data.sample("val", 60, seed=2)  # every class in proportion, seeded by --seed
    assert torch.bincount(sample.split("val")[1], minlength=10).min() > 0
    model = create_model("small_cnn", data, checkpoint)
    assert result["before"]["accuracy"] == evaluate(model, sample, "val", device="cpu")
