"""`autorank train` / `autorank eval` end to end: the accuracies of ../shared's checkpoints, the
digits run, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from autorank.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "model, file, accuracy, params",
    [("resnet20", "resnet20-12fca82f.th", 0.8103, 269_722), ("resnet56", "resnet56-4bfd9763.th", 0.8320, 853_018)],
)
def test_eval_of_public_checkpoints_on_the_jpeg_test_split(capsys, shared, cifar, model, file, accuracy, params):
    code, out, _ = run_cli(
        capsys, "eval", "--model", model, "--weights", str(shared / "models" / "cifar10" / file),
        "--data", f"imagefolder:{shared / 'data' / 'cifar10-jpeg.tar.gz'}", "--split", "test", "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["accuracy"] == pytest.approx(accuracy, abs=0.002)
    assert result["params"] == params
    assert result["size_bytes"] >= 4 * params and result["macs"] > 0 and result["latency_ms"] > 0


def test_train_then_eval_the_written_checkpoint(capsys, tmp_path):
    checkpoint = tmp_path / "digits.pt"
    code, out, _ = run_cli(
        capsys, "train", "--data", "digits", "--model", "small_cnn", "--epochs", "8", "--batch-size", "64",
        "--out", str(checkpoint), "--json",
    )
    assert code == 0
    trained = json.loads(out)
    assert trained["accuracy"] >= 0.95 and trained["checkpoint"] == str(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["model"] == "small_cnn"
    code, out, _ = run_cli(capsys, "eval", "--data", "digits", "--weights", str(checkpoint), "--json")
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(trained["accuracy"])
    # a brief fine-tune distilled from the checkpoint as loaded keeps what it knew
    code, out, _ = run_cli(capsys, "train", "--data", "digits", "--weights", str(checkpoint), "--steps", "5",
                           "--warmup", "2", "--distill", "0.9", "--out", str(tmp_path / "distilled.pt"), "--json")
    assert code == 0 and json.loads(out)["accuracy"] >= trained["accuracy"] - 0.02


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "resnet21"], "unknown model 'resnet21'"),
        (["eval", "--model", "resnet20", "--weights", "missing.th"], "weights file not found: missing.th"),
        (["eval", "--data", "imagenet"], "bad --data 'imagenet'"),
        (["eval", "--data", "imagefolder:/no/such/folder"], "image folder or archive not found"),
        (["train", "--steps", "0"], "steps must be >= 1"),
        (["train", "--steps", "1", "--distill", "0.5"], "--distill needs --weights"),
        (["eval", "--device", "cuda:7"], "cuda"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("autorank: error: ") and message in err


def test_mismatched_checkpoint_through_the_installed_command(shared):
    """The console entry point itself: exit 2, one line naming the offending keys, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "autorank", "eval", "--model", "resnet32", "--data", "digits",
         "--weights", str(shared / "models" / "cifar10" / "resnet20-12fca82f.th")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "does not fit CifarResNet" in proc.stderr and "missing" in proc.stderr and "conv1.weight" in proc.stderr


def test_ctrl_c_while_the_commands_import_exits_130_without_a_traceback(capsys, monkeypatch):
    """Importing torch takes seconds; a Ctrl-C then is an interrupt like any other."""
    import autorank.cli

    def interrupted(command):
        raise KeyboardInterrupt

    monkeypatch.setattr(autorank.cli, "build_parser", interrupted)
    code, out, err = run_cli(capsys, "ui", "--search", "anywhere")
    assert (code, out, err) == (130, "", "autorank: interrupted\n")
