"""`autorank search` / `autorank best` input errors: one line, exit 2, no output folder left behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from autorank.cli import main
from autorank.cli.search import closest_text
from autorank.records import format_size, pareto_front
from autorank.search import TrialRecord, load_search
from autorank.search.space import Constraints
from tests.search.conftest import TINY_SPACE

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


def test_closest_trial_names_the_limits_it_missed():
    def trial(number, accuracy, size):
        return TrialRecord(number=number, state="complete", params={},
                           metrics={"accuracy": accuracy, "size_bytes": size}, summary="x")

    reference = {"accuracy": 0.95, "size_bytes": 100_000}
    trials = [trial(0, 0.80, 20_000), trial(1, 0.877, 30_000), trial(2, 0.60, 5_000),
              TrialRecord(number=3, state="failed", params={})]
    assert closest_text(trials, Constraints(max_drop=3.0), reference) == "closest: trial 1, 7.3 pt drop, limit 3.0"
    both = Constraints(max_size=10_000, max_drop=3.0)  # trial 2 misses only the drop, by the least overall
    assert closest_text(trials, both, reference) == "closest: trial 1, 30.0 KB, limit 10.0 KB; 7.3 pt drop, limit 3.0"
    assert closest_text(trials, Constraints(min_ratio=30), reference) == "closest: trial 2, 20.0x smaller, limit 30x"


def test_a_search_without_feasible_trials_shows_the_unconstrained_front(tmp_path, capsys, pretrained_digits):
    space = tmp_path / "tight.yaml"
    space.write_text(yaml.safe_dump({**TINY_SPACE, "constraints": {"max_size": "2KB"}}))
    out = tmp_path / "out"
    assert main(["search", "--config", str(space), "--model", "small_cnn", "--weights", str(pretrained_digits),
                 "--data", "digits", "--out", str(out), "--trials", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    search = load_search(out)
    done = [t for t in search.trials if t.finished_ok]
    front = pareto_front(done, search.space.objectives, feasible_only=False)
    assert done and not any(t.feasible for t in done) and front
    assert "no trial meets size <= 2,000 B; unconstrained Pareto front" in text
    rows = [m.group(1) for m in re.finditer(r"^\s*(\d+)\s+[\d.]+%", text, re.MULTILINE)]
    assert rows == [str(t.number) for t in front]  # the table lists the trials it has
    smallest = min(done, key=lambda t: t.metrics["size_bytes"])  # size is the only limit: the closest is the smallest
    assert f"closest: trial {smallest.number}, {format_size(smallest.metrics['size_bytes'])}, limit 2.0 KB" in text
    assert "no feasible trial yet" in text
