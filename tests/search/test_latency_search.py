"""ONNX Runtime latency as a measured objective, constraint and selection limit of a search."""

from __future__ import annotations

import json

import pytest
import yaml

from autorank.cli import main
from autorank.compression import Plan
from autorank.engine.latency import LatencyTable, default_path
from autorank.errors import AutorankError
from autorank.models import create_model
from autorank.search import best_trial, load_search
from autorank.search.run import run_search
from autorank.search.space import load_space, parse_latency, space_from_dict
from tests.search.conftest import TINY_SPACE


def test_latency_limits_parse_with_units_and_bad_ones_are_one_line_errors(tmp_path):
    assert parse_latency("0.3ms") == 0.3
    assert parse_latency("300us") == pytest.approx(0.3)
    assert parse_latency(2) == 2.0
    for bad in ("fast", "-1ms", "0", True):
        with pytest.raises(AutorankError, match="expected a positive latency such as 0.3ms"):
            parse_latency(bad, "--max-latency")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPACE, "objectives": ["accuracy", "ort_latency_ms"],
                                    "constraints": {"max_latency_ms": 0.5}, "latency": {"threads": 1}}))
    space = load_space(path)
    assert space.constraints.max_latency_ms == 0.5 and space.latency.threads == 1
    assert space_from_dict(space.to_dict()) == space
    path.write_text(yaml.safe_dump({**TINY_SPACE, "latency": {"threads": 0}}))
    with pytest.raises(AutorankError, match="latency.threads"):
        load_space(path)


def test_a_search_measures_ort_latency_and_best_selects_on_it(tmp_path, monkeypatch, digits, pretrained_digits,
                                                                capsys):
    monkeypatch.setenv("AUTORANK_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**TINY_SPACE, "objectives": ["accuracy", "ort_latency_ms", "ort_throughput"],
                                     "finetune": {**TINY_SPACE["finetune"], "steps": 2},
                                     "constraints": {}, "latency": {"threads": 1, "batch_size": 16},
                                     "search": {**TINY_SPACE["search"], "trials": 3}}))
    out = tmp_path / "search"
    run_search(space, "small_cnn", pretrained_digits, "digits", out, data=digits, progress=False)
    search = load_search(out)
    done = [t for t in search.trials if t.finished_ok]
    assert done and all(t.metrics["ort_latency_ms"] > 0 and t.metrics["ort_throughput"] > 0 for t in done)
    assert search.reference_for(done[0])["ort_latency_ms"] > 0
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 1  # one table for the search
    fastest = min(t.figures["ort_latency_ms"] for t in done)
    assert best_trial(search, max_latency_ms=fastest).figures["ort_latency_ms"] == fastest
    with pytest.raises(AutorankError, match="ORT latency <= "):
        best_trial(search, max_latency_ms=fastest / 100)
    assert main(["best", "--search", str(out), "--max-latency", f"{fastest * 1.01:.6f}ms", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trial"] in {t.number for t in done}


def test_ray_trials_get_no_latency_table_and_the_driver_adds_their_figures(tmp_path, monkeypatch, digits,
                                                                          pretrained_digits):
    """Timings are the driver's: a Ray worker gets the context without the table (it would time missing
    blocks beside other trials and write the driver's cache path on its own disk); the driver predicts
    each finished trial's `ort_*` figures and its `max_latency_ms` constraint from its table."""
    from ray import tune

    monkeypatch.setenv("AUTORANK_CACHE", str(tmp_path / "cache"))
    sent = []
    with_parameters = tune.with_parameters

    def spy(trainable, **kwargs):
        sent.append(kwargs["ctx"])
        return with_parameters(trainable, **kwargs)

    monkeypatch.setattr(tune, "with_parameters", spy)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**TINY_SPACE, "objectives": ["accuracy", "ort_latency_ms"],
                                     "finetune": {**TINY_SPACE["finetune"], "steps": 2},
                                     "constraints": {"max_latency_ms": 1000.0},
                                     "latency": {"threads": 1, "batch_size": 16},
                                     "search": {**TINY_SPACE["search"], "trials": 2}}))
    out = tmp_path / "search"
    run_search(space, "small_cnn", pretrained_digits, "digits", out, data=digits, progress=False, executor="ray",
               trial_resources={"cpu": 1.0, "gpu": 0.0}, max_concurrent=1)
    assert len(sent) == 1 and sent[0].latency is None
    done = [t for t in load_search(out).trials if t.finished_ok]
    assert len(done) == 2
    table = LatencyTable(create_model("small_cnn", digits, pretrained_digits), digits.input_shape,
                         default_path("small_cnn", digits.input_shape, 1), model_key="small_cnn", threads=1,
                         batch_size=16)
    for t in done:
        predicted = table.predict(Plan.from_json(json.dumps(t.plan)))
        assert t.metrics["ort_latency_ms"] == predicted.b1_ms and t.metrics["ort_throughput"] == predicted.throughput
        assert t.constraints["max_latency_ms"] == pytest.approx(predicted.b1_ms - 1000.0)
        written = json.loads((out / "trials" / str(t.number) / "metrics.json").read_text())
        assert written["metrics"]["ort_latency_ms"] == predicted.b1_ms
    assert table.measured == 0  # every block the trials needed is in the driver's table file
