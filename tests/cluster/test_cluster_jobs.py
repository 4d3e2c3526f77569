"""`autorank submit` of a search as a Ray job on the cluster's head, with a local checkpoint sent along,
watched with `autorank jobs` / `logs` until it finishes, its trials in a shared MLflow server
(`autorank server`), its folder fetched back and exported from the fetched copy."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.cluster.cluster import TRIAL_RESOURCE, run
from tests.reliability.searches import cli_env, mlflow_trial_runs, write_space

TRIALS = 2


def archived(uri: str, job: str) -> bool:
    """The job's search is archived in the MLflow server (its last step), as `autorank fetch` looks it up."""
    from mlflow import MlflowClient

    from autorank.tracking.jobs import JOB_TAG

    client = MlflowClient(uri)
    found = client.get_experiment_by_name("autorank")
    return found is not None and bool(client.search_runs([found.experiment_id], f"tags.`{JOB_TAG}` = '{job}'",
                                                         max_results=1))


def test_submitted_search_runs_as_a_job_tracked_in_the_shared_mlflow_server(cluster, tmp_path):
    from autorank.tracking.server import ServerConfig, start_server, stop_server

    import torch

    from autorank.data import load_data
    from autorank.models import create_model

    server = ServerConfig(port=0, data_dir=tmp_path / "mlflow")
    uri = start_server(server)["url"]
    try:
        space = write_space(tmp_path, name="job", trials=TRIALS, steps=4)
        checkpoint = tmp_path / "small_cnn.pt"   # a local --weights file: it travels with the job
        torch.save(create_model("small_cnn", load_data("digits")).state_dict(), checkpoint)
        out = cluster.driver_root / "job-search"   # on the head
        submitted = run(cluster, ["submit", "--address", cluster.dashboard, "--mlflow-uri", uri, "--config", str(space),
                                  "--model", "small_cnn", "--weights", str(checkpoint), "--data", "digits",
                                  "--out", str(out), "--trials", str(TRIALS),
                                  "--trial-resources", f"cpu=1,{TRIAL_RESOURCE}=1", "--max-concurrent", "2"])
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job = submitted.stdout.strip().splitlines()[-1]

        listed = run(cluster, ["jobs", "--address", cluster.dashboard])
        assert listed.returncode == 0 and job in listed.stdout, listed.stderr[-2000:]
        deadline, status, asked = time.monotonic() + 900, "PENDING", time.monotonic()
        while status in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, f"job {job} still {status}"
            # each `autorank jobs` is a fresh process (no torch, but Ray's client: about 2 s of a CPU the
            # job needs on a busy two-core box): asked when the job's last step (the archive, tagged in
            # MLflow) is done, or every 10 s in case the job ends without one
            if not archived(uri, job) and time.monotonic() - asked < 10:
                time.sleep(0.5)
                continue
            shown = run(cluster, ["jobs", job, "--address", cluster.dashboard, "--json"])
            assert shown.returncode == 0, shown.stderr[-2000:]
            status, asked = json.loads(shown.stdout)["status"], time.monotonic()
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

        # the checkpoint was copied into the search folder on the head (not left in Ray's temporary working
        # directory), archived with it, and the fetched search.json names the fetched copy: export works here
        assert (out / "weights.pt").read_bytes() == checkpoint.read_bytes()
        assert search.info["weights"] == str((fetched / "weights.pt").resolve())
        assert (fetched / "weights.pt").read_bytes() == checkpoint.read_bytes()
        exported = run(cluster, ["export", "--search", str(fetched), "--precision", "fp32", "--out",
                                 str(tmp_path / "best.onnx"), "--threads", "1", "--no-bench", "--no-register",
                                 "--json"])
        assert exported.returncode == 0, exported.stderr[-4000:]
        assert json.loads(exported.stdout)["verification"]["top1_agreement"] >= 0.99
    finally:
        stop_server(server)


def test_the_cluster_commands_run_without_importing_torch():
    """A client polling the cluster (`autorank jobs`, `logs`) pays seconds, not the ten of importing torch."""
    probe = ("import sys; from autorank.cli import main; code = main(['jobs', '--address', 'http://127.0.0.1:9']); "
             "print(code, 'torch' in sys.modules)")
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env=cli_env())
    assert "cannot reach the Ray job server" in ran.stderr, ran.stderr[-2000:]
    assert ran.stdout.split() == ["2", "False"], ran.stdout   # the error's exit code; torch never imported
