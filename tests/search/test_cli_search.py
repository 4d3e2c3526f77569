"""`autorank search` / `autorank best` input errors: one line, exit 2, no output folder left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autorank.cli import main

REPO = Path(__file__).resolve().parents[2]


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("problem", ["yaml", "name", "model", "data", "weights", "trials", "budget", "resources"])
def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path, capsys, problem, tiny_space):
    space = tiny_space
    if problem == "yaml":
        space = tmp_path / "bad.yaml"
        space.write_text(yaml.safe_dump({"finetune": {"steps": -3}}))
    if problem == "name":
        space = "resnet_cifar10"
    argv = ["search", "--config", str(space), "--model", "small_cnn", "--data", "digits",
            "--out", str(tmp_path / "out"), "--no-progress"]
    bad = {"model": ["--model", "resnet7"], "data": ["--data", "mnist"], "weights": ["--weights", str(tmp_path / "x.pt")],
           "trials": ["--trials", "0"], "budget": ["--time-budget", "soon"],
           "resources": ["--executor", "ray", "--trial-resources", "tpu=1"]}.get(problem, [])
    code, err = run(argv + bad, capsys)
    assert code == 2
    assert err.startswith("autorank: error: ") and err.count("\n") == 1, err
    if problem == "yaml":
        assert "'finetune.steps'" in err
    if problem == "name":
        assert "shipped spaces are default, resnet_cifar" in err
    assert not (tmp_path / "out").exists()


def test_search_needs_its_inputs_or_resume(tmp_path, capsys):
    code, err = run(["search", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--config, --model and --data" in err
    code, err = run(["search", "--out", str(tmp_path / "out"), "--resume"], capsys)
    assert code == 2 and "holds no search" in err
    code, err = run(["best", "--search", str(tmp_path)], capsys)
    assert code == 2 and "holds no search" in err


def test_spaces_lists_the_shipped_spaces_and_prints_one(capsys):
    assert main(["spaces"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["default", "resnet_cifar"]
    assert "small CNN on sklearn digits" in lines[0] and "CIFAR ResNets" in lines[1]
    assert main(["spaces", "resnet_cifar"]) == 0
    assert capsys.readouterr().out == (REPO / "search_spaces" / "resnet_cifar.yaml").read_text()
    code, err = run(["spaces", "resnet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "shipped spaces are default, resnet_cifar" in err
