"""`autorank submit` of a search as a Ray job on the cluster's head, watched with `autorank jobs` / `logs`
until it finishes, its trials in a shared MLflow server (`autorank server`), its folder fetched back."""

from __future__ import annotations

import json
import time

from tests.cluster.cluster import TRIAL_RESOURCE, run
from tests.reliability.searches import mlflow_trial_runs, write_space

TRIALS = 2


def test_submitted_search_runs_as_a_job_tracked_in_the_shared_mlflow_server(cluster, tmp_path):
    from autorank.tracking.server import ServerConfig, start_server, stop_server

    server = ServerConfig(port=0, data_dir=tmp_path / "mlflow")
    uri = start_server(server)["url"]
    try:
        space = write_space(tmp_path, name="job", trials=TRIALS, steps=4)
        out = cluster.driver_root / "job-search"   # on the head
        submitted = run(cluster, ["submit", "--address", cluster.dashboard, "--mlflow-uri", uri, "--config", str(space),
                                  "--model", "small_cnn", "--data", "digits", "--out", str(out), "--trials", str(TRIALS),
                                  "--trial-resources", f"cpu=1,{TRIAL_RESOURCE}=1", "--max-concurrent", "2"])
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job = submitted.stdout.strip().splitlines()[-1]

        listed = run(cluster, ["jobs", "--address", cluster.dashboard])
        assert listed.returncode == 0 and job in listed.stdout, listed.stderr[-2000:]
        deadline, status = time.monotonic() + 900, "PENDING"
        while status in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, f"job {job} still {status}"
            time.sleep(5)
            shown = run(cluster, ["jobs", job, "--address", cluster.dashboard, "--json"])
            assert shown.returncode == 0, shown.stderr[-2000:]
            status = json.loads(shown.stdout)["status"]
        logs = run(cluster, ["logs", job, "--address", cluster.dashboard])
        assert logs.returncode == 0
        assert status == "SUCCEEDED", logs.stdout[-4000:]
        assert f"{TRIALS} trials (0 failed)" in logs.stdout and "archived the search" in logs.stdout

        # the trials are in the shared server, once each, with the study's figures
        fetched = tmp_path / "fetched"
        got = run(cluster, ["fetch", job, "--mlflow-uri", uri, "--to", str(fetched)])
        assert got.returncode == 0, got.stderr[-3000:]
        from autorank.search import load_search

        search = load_search(fetched)
        done = {t.number: t for t in search.trials if t.counted}
        runs = mlflow_trial_runs(uri, search.info["search_id"])
        assert len(done) == TRIALS and sorted(int(r.data.tags["autorank.trial"]) for r in runs) == sorted(done)
        for r in runs:
            assert r.data.metrics["accuracy"] == done[int(r.data.tags["autorank.trial"])].metrics["accuracy"]
        best = run(cluster, ["best", "--search", str(fetched), "--json"])
        assert best.returncode == 0, best.stderr[-2000:]
        assert json.loads(best.stdout)["weights"].startswith(str(fetched))
    finally:
        stop_server(server)
