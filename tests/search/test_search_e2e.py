"""End-to-end searches on digits: local and Ray executors, seeds, front, best, interrupt + resume."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch

from autorank import engine
from autorank.cli import main
from autorank.compression.ranks import method_params, ratio_ranks
from autorank.errors import AutorankError, TrialDiverged
from autorank.records import pareto_front
from autorank.search import best_trial, load_search, rebuild_trial
from autorank.search.run import run_search
from autorank.search.space import load_space
from autorank.tracking import MlflowCallback

def mlflow_trial_runs(out_dir, search_id):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autorank")
    runs = client.search_runs([exp.experiment_id], f"tags.`autorank.search_id` = '{search_id}'", max_results=1000)
    return client, [r for r in runs if r.data.tags.get("autorank.kind") == "trial"], \
        next(r for r in runs if r.data.tags.get("autorank.kind") == "search")


@pytest.fixture(scope="module")
def local_search(tmp_path_factory, pretrained_digits, tiny_space, digits):
    out = tmp_path_factory.mktemp("local") / "search"
    result = run_search(tiny_space, "small_cnn", pretrained_digits, "digits", out, trials=6, data=digits,
                        progress=False, callbacks=[MlflowCallback()])
    return result


def test_local_search_records_every_trial_in_optuna_and_mlflow(local_search):
    out = local_search.out_dir
    info = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    client, runs, parent = mlflow_trial_runs(out, info["search_id"])
    assert sorted(int(r.data.tags["autorank.trial"]) for r in runs) == list(range(6))
    for run in runs:
        t = study.trials[int(run.data.tags["autorank.trial"])]
        assert run.data.metrics["accuracy"] == pytest.approx(t.values[0])
        assert run.data.metrics["size_bytes"] == t.values[1]
        assert run.data.params["layer.features.10.method"] == t.user_attrs["plan"]["layers"]["features.10"]["method"]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.metrics["kept_start"] in (0.0, 1.0)  # the fine-tune guard's verdict is recorded
    # the live front: tags, files on disk and as artifacts of the parent run
    front = {t.number for t in local_search.front}
    assert front and {int(r.data.tags["autorank.trial"]) for r in runs if r.data.tags["pareto"] == "true"} == front
    assert {json.loads((out / "pareto.json").read_text())["front"][i]["trial"] for i in range(len(front))} == front
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.json", "pareto.csv", "pareto.png", "pareto.html"} <= artifacts
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_recipe_warm_starts_are_the_first_trials(local_search, tiny_space):
    """Layers mode: int8 weights alone, then Tucker-2 and TT at 50% retention (int8), enqueued before any
    sampling (trials // 2 of them); each runs its recipe's plan, no layer above its own weight count."""
    search = load_search(local_search.out_dir)
    layers = search.info["layers"]
    study = optuna.load_study(study_name=search.info["study_name"], storage=search.info["storage"])
    seeds = [t for t in study.trials if "seed" in t.user_attrs]
    assert [(t.number, t.user_attrs["seed"]) for t in seeds] == [(0, "int8"), (1, "tucker2@0.5/int8"),
                                                                  (2, "tt@0.5/int8")]
    for trial in seeds:
        method = trial.user_attrs["seed"].partition("@")[0] if "@" in trial.user_attrs["seed"] else "none"
        for name, lp in trial.user_attrs["plan"]["layers"].items():
            shape = tuple(layers[name]["shape"])
            assert lp["precision"] == "int8"
            if layers[name]["kind"] == "linear" or method == "none":
                assert lp["method"] == "none"
            elif lp["method"] == "none":  # 50% ranks that would not shrink the layer leave it whole
                assert method_params(method, shape, tuple(ratio_ranks(method, shape, 0.5))) >= math.prod(shape)
            else:
                assert lp["method"] == method and lp["rank"] == list(ratio_ranks(method, shape, 0.5))
                assert method_params(method, shape, tuple(lp["rank"])) < math.prod(shape)
        # its parameters are the space's point nearest the recipe: the sampler learns from it
        conv = next(n for n in layers if layers[n]["kind"] == "conv")
        assert trial.params[f"{conv}.method"] == method and trial.params[f"{conv}.precision"] == "int8"
    assert load_space(tiny_space).trials == 6


def test_front_members_keep_weights_that_rebuild_the_measured_model(local_search, digits):
    search = load_search(local_search.out_dir)
    unconstrained = {t.number for t in pareto_front(search.trials, ("accuracy", "size_bytes"), feasible_only=False)}
    for t in search.trials:
        assert t.has_weights == (t.number in unconstrained)
    member = local_search.front[0]
    model = rebuild_trial(local_search.out_dir, trial=member.number).model
    assert engine.evaluate(model, digits, "val") == pytest.approx(member.metrics["accuracy"])


def test_best_is_the_most_accurate_feasible_trial_never_an_infeasible_one(local_search, capsys):
    search = load_search(local_search.out_dir)
    done = sorted((t for t in search.trials if t.finished_ok), key=lambda t: -t.metrics["accuracy"])
    # the search's own limit (drop <= 5 points): the best respects it
    own = best_trial(search)
    assert own.metrics["drop_points"] <= 5.0
    assert own.metrics["accuracy"] == max(t.metrics["accuracy"] for t in done if t.metrics["drop_points"] <= 5.0)
    # a size limit just below the most accurate trial makes it infeasible: never returned
    limit = int(done[0].metrics["size_bytes"]) - 1
    best = best_trial(search, max_size=limit, max_drop=100.0)
    assert best.number != done[0].number and best.metrics["size_bytes"] <= limit
    assert best.metrics["accuracy"] == max(t.metrics["accuracy"] for t in done if t.metrics["size_bytes"] <= limit)
    with pytest.raises(AutorankError, match="none of the 6 completed trials"):
        best_trial(search, max_size=10)
    assert main(["best", "--search", str(search.out_dir), "--max-size", str(limit), "--max-drop", "100",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trial"] == best.number
    assert main(["best", "--search", str(search.out_dir), "--max-size", "10B"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the" in err


def test_interrupted_search_resumes_to_exactly_the_requested_trials(tmp_path, pretrained_digits, tiny_space,
                                                                     digits, monkeypatch):
    """Trial 3 diverges (recorded failed, the search goes on); Ctrl-C hits trial 4; --resume finishes."""
    import autorank.search.trial as trial_module

    calls = {"n": 0}
    real_train = engine.train

    def flaky_train(model, data, config, **options):
        calls["n"] += 1  # call 1 is the reference fine-tune
        if calls["n"] == 4:
            raise TrialDiverged("training diverged: non-finite loss by step 3")
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_train(model, data, config, **options)

    monkeypatch.setattr(trial_module.engine, "train", flaky_train)
    out = tmp_path / "search"
    with pytest.raises(KeyboardInterrupt):
        run_search(tiny_space, "small_cnn", pretrained_digits, "digits", out, trials=5, data=digits, progress=False,
                   callbacks=[MlflowCallback()])
    monkeypatch.setattr(trial_module.engine, "train", real_train)
    info = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "RUNNING"]
    interrupted_params = study.trials[3].params

    result = run_search(None, out_dir=out, resume=True, trials=5, data=digits, progress=False,
                        callbacks=[MlflowCallback()])
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    counted = [t for t in result.trials if t.counted]
    assert len(counted) == 5 and len({t.number for t in counted}) == 5
    assert [t.state for t in result.trials] == ["complete", "complete", "failed", "interrupted", "complete",
                                               "complete"]
    assert result.trials[2].reason.startswith("TrialDiverged: training diverged")
    assert study.trials[4].params == interrupted_params  # the interrupted choices ran again
    _, runs, _ = mlflow_trial_runs(out, info["search_id"])
    assert sorted(int(r.data.tags["autorank.trial"]) for r in runs) == [t.number for t in counted]
    assert {r.data.tags["autorank.trial"]: r.info.status for r in runs}["2"] == "FAILED"


def test_ray_executor_gives_the_same_records(tmp_path, pretrained_digits, tiny_space, digits, local_search):
    out = tmp_path / "search"
    result = run_search(tiny_space, "small_cnn", pretrained_digits, "digits", out, trials=3, executor="ray",
                        trial_resources={"cpu": 1.0, "gpu": 0.0}, max_concurrent=2, data=digits, progress=False,
                        callbacks=[MlflowCallback()])
    info = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    _, runs, _ = mlflow_trial_runs(out, info["search_id"])
    assert sorted(int(r.data.tags["autorank.trial"]) for r in runs) == [0, 1, 2]
    # the seed trials (same sampler seed) make the same choices and plans as with the local executor
    local = {t.number: t for t in local_search.trials}
    for t in result.trials:
        if t.number == 0:
            assert t.params == local[0].params and t.plan == local[0].plan
            assert t.metrics["size_bytes"] == local[0].metrics["size_bytes"]
            assert t.metrics["accuracy"] == pytest.approx(local[0].metrics["accuracy"], abs=0.03)
        assert (out / "trials" / str(t.number) / "metrics.json").is_file()
