"""MLflow mirror: every finished trial logged exactly once, replayable after outages and crashes."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow import MlflowClient

from autorank.records import TrialRecord
from autorank.tracking import SearchTracker
from autorank.tracking.plots import plotly_js_name
from autorank.tracking.tracker import EXPERIMENT_KIND_TAG, default_tracking_uri, experiment_id_for


def rec(number, accuracy, size, state="complete"):
    metrics = {} if state == "failed" else {"accuracy": accuracy, "size_bytes": size, "ratio": 1e5 / size}
    return TrialRecord(number=number, state=state, params={"all.conv.method": "tucker2"}, metrics=metrics,
                       constraints={} if state == "failed" else {"max_drop": -0.5},
                       plan={"layers": {"conv": {"method": "tucker2", "rank": [3, 4], "precision": "int8"}},
                             "activations": "fp32"},
                       reason="TrialDiverged: nan" if state == "failed" else None, summary="tucker2 x1 | int8 x1",
                       started=time.time() - 5, finished=time.time())


def tracker(out, **kw):
    return SearchTracker(default_tracking_uri(out), experiment="autorank", search_id="s1", run_name="test",
                         out_dir=out, objectives=("accuracy", "size_bytes"),
                         reference={"accuracy": 0.9, "size_bytes": 1e5, "macs": 1e6}, limits={"max_drop": 1.0},
                         parent_params={"model": "small_cnn"}, retry_s=0.05, **kw)


def trial_runs(out):
    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("autorank")
    runs = client.search_runs([exp.experiment_id], "tags.`autorank.kind` = 'trial'", max_results=100)
    return client, runs


def test_trials_logged_once_with_front_tags_and_artifacts(tmp_path):
    records = [rec(0, 0.80, 20_000), rec(1, 0.85, 50_000), rec(2, 0.70, 60_000), rec(3, 0, 0, "failed")]
    t = tracker(tmp_path)
    parent = t.start()
    t.submit(records[:2])
    assert t.close(records) == []
    client, runs = trial_runs(tmp_path)
    by_trial = {r.data.tags["autorank.trial"]: r for r in runs}
    assert sorted(by_trial) == ["0", "1", "2", "3"]
    assert {n for n, r in by_trial.items() if r.data.tags["pareto"] == "true"} == {"0", "1"}
    assert by_trial["3"].info.status == "FAILED" and by_trial["3"].data.tags["reason"] == "TrialDiverged: nan"
    assert by_trial["0"].data.params["layer.conv.rank"] == "3x4"
    assert by_trial["0"].data.metrics["accuracy"] == 0.80
    assert {a.path for a in client.list_artifacts(parent)} >= {"pareto.json", "pareto.csv", "pareto.png",
                                                               "pareto.html"}
    assert client.get_run(parent).data.metrics["trials_done"] == 4

    # a second tracker on the same search (a resume) adds only what is new, and moves the front tag
    again = tracker(tmp_path)
    assert again.start() == parent
    assert again.close([*records, rec(4, 0.90, 10_000)]) == []
    _, runs = trial_runs(tmp_path)
    by_trial = {r.data.tags["autorank.trial"]: r for r in runs}
    assert len(runs) == 5
    assert {n for n, r in by_trial.items() if r.data.tags["pareto"] == "true"} == {"4"}


def test_outage_is_retried_and_nothing_is_lost(tmp_path, monkeypatch):
    t = tracker(tmp_path)
    t.start()
    real = t.client.create_run
    failures = {"left": 3}

    def flaky(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("tracking server unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(t.client, "create_run", flaky)
    records = [rec(i, 0.7 + i / 100, 10_000 * (i + 1)) for i in range(3)]
    t.submit(records)
    assert t.close(records, attempts=5) == []
    _, runs = trial_runs(tmp_path)
    assert sorted(int(r.data.tags["autorank.trial"]) for r in runs) == [0, 1, 2]


def test_unreachable_server_reports_unlogged_trials(tmp_path):
    t = SearchTracker("http://127.0.0.1:9", experiment="autorank", search_id="s2", run_name="x", out_dir=tmp_path,
                      objectives=("accuracy", "size_bytes"), reference={"accuracy": 0.9, "size_bytes": 1e5},
                      limits={}, parent_params={}, retry_s=0.01)
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        assert t.start() is None
        assert t.close([rec(0, 0.8, 1e4)], attempts=1) == [0]
        assert t.last_error
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_half_written_run_is_replaced(tmp_path):
    t = tracker(tmp_path)
    parent = t.start()
    t.close([])
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("autorank")
    client.create_run(exp.experiment_id, tags={"mlflow.parentRunId": parent, "autorank.search_id": "s1",
                                               "autorank.kind": "trial", "autorank.trial": "0"})  # crash mid-log
    again = tracker(tmp_path)
    again.start()
    assert again.close([rec(0, 0.8, 1e4)]) == []
    _, runs = trial_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_empty_search_still_writes_front_files(tmp_path):
    t = tracker(tmp_path)
    t.start()
    assert t.close([]) == []
    assert (tmp_path / "pareto.csv").read_text().startswith("trial,")


def test_experiments_open_in_the_classic_runs_view(tmp_path):
    t = tracker(tmp_path)
    t.start()
    t.close([rec(0, 0.8, 1e4)])
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert client.get_experiment_by_name("autorank").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made elsewhere gets the kind only when it has none
    plain = client.create_experiment("plain")
    genai = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id_for(client, "plain") == plain and experiment_id_for(client, "genai") == genai
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_plotly_js_is_logged_once_per_search_and_the_page_stays_small(tmp_path, monkeypatch):
    records = [rec(i, 0.70 + i / 100, 10_000 * (i + 1)) for i in range(4)]  # each one grows the front
    logged: list[str] = []

    def spy_on(t):
        real = t.client.log_artifact
        monkeypatch.setattr(t.client, "log_artifact", lambda run_id, path: (logged.append(Path(path).name),
                                                                              real(run_id, path)))
    t = tracker(tmp_path)
    parent = t.start()
    spy_on(t)
    for n in range(1, 5):
        t.sync(records[:n], final=False)  # a new front each time: the plots are redrawn and relogged
    assert t.close(records) == []
    js = plotly_js_name()
    assert logged.count("pareto.html") == 5 and logged.count(js) == 1
    page = (tmp_path / "pareto.html").read_text()
    assert len(page.encode()) < 50_000 and f'<script src="{js}">' in page
    assert f"get-artifact?path={js}&run_uuid={parent}" in page  # the copy MLflow's artifact view loads
    client = MlflowClient(default_tracking_uri(tmp_path))
    sizes = {a.path: a.file_size for a in client.list_artifacts(parent)}
    assert sizes[js] == (tmp_path / js).stat().st_size > 4_000_000 and sizes["pareto.html"] < 50_000

    logged.clear()  # a resumed search reuses the parent run and its copy
    again = tracker(tmp_path)
    assert again.start() == parent
    spy_on(again)
    assert again.close([*records, rec(4, 0.9, 5_000)]) == []
    assert logged.count("pareto.html") == 1 and js not in logged
