"""The Ray job client side of `autorank submit / jobs / logs / stop / fetch`, without a cluster: the job
server is a fake client object (Ray's JobSubmissionClient's methods, raising as Ray's does); the real
cluster runs in tests/cluster/test_cluster_jobs.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import json
import shutil
import subprocess

import pytest

import autorank.tracking.jobs as jobs
from autorank.cli import main
from autorank.errors import AutorankError

URI = "http://127.0.0.1:5000"


class FakeJobServer:
    """Records what was submitted (and a copy of the working directory, gone once submit returns);
    `fail` maps a method name to the errors it raises, one per call, before it answers."""

    def __init__(self, fail: dict[str, list[Exception]] | None = None, keep: Path | None = None):
        self.fail, self.keep = fail or {}, keep
        self.submitted: list[dict] = []
        self.jobs = [SimpleNamespace(submission_id="job-1", job_id="raylet-1", status="RUNNING", start_time=1,
                                     end_time=None, message="", entrypoint="autorank search", metadata={})]

    def _maybe_fail(self, method: str) -> None:
        if self.fail.get(method):
            raise self.fail[method].pop(0)

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self._maybe_fail("submit_job")
        self.submitted.append({"entrypoint": entrypoint, "submission_id": submission_id, "metadata": metadata,
                               "files": sorted(p.name for p in Path(runtime_env["working_dir"]).iterdir())})
        if self.keep is not None:
            shutil.copytree(runtime_env["working_dir"], self.keep / submission_id)
        return submission_id

    def list_jobs(self):
        self._maybe_fail("list_jobs")
        return self.jobs

    def get_job_logs(self, job_id):
        self._maybe_fail("get_job_logs")
        return "logs\n"

    def stop_job(self, job_id):
        self._maybe_fail("stop_job")
        return True


@pytest.fixture
def server(monkeypatch):
    def use(fake: FakeJobServer) -> FakeJobServer:
        monkeypatch.setattr(jobs, "job_client", lambda address: fake)
        return fake
    return use


@pytest.mark.parametrize("out", ["autorank-jobs/x", "./x", "~/x", "$HOME"])
def test_submit_refuses_a_relative_out_before_contacting_the_cluster(out, server, capsys):
    """A relative --out would be a folder in Ray's temporary copy of the working directory."""
    fake = server(FakeJobServer())
    code = main(["submit", "--mlflow-uri", URI, "--config", "default", "--model", "small_cnn", "--data", "digits",
                 "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--out must be an absolute path on the head or $HOME/..." in err
    assert fake.submitted == []


@pytest.mark.parametrize("out", ["absolute", "$HOME/autorank-jobs/x"])
def test_submit_takes_an_absolute_or_home_out(out, server, tmp_path):
    out = str(tmp_path / "x") if out == "absolute" else out
    fake = server(FakeJobServer())
    assert jobs.submit_search(None, ["--config", "default"], {}, out=out, mlflow_uri=URI, job_id="j") == "j"
    assert fake.submitted[0]["metadata"]["autorank.out"] == out


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("Request failed with status code 400: Job with submission_id j already exists. "
                  "Please use a different submission_id.\nTraceback (most recent call last): ..."),
     "Ray job server: Request failed with status code 400: Job with submission_id j already exists. "
     "Please use a different submission_id."),
    (ValueError("Package size (600.00MiB) exceeds the maximum size of 500.00MiB.\nTo exclude large files ..."),
     "Ray job server: Package size (600.00MiB) exceeds the maximum size of 500.00MiB."),
])
def test_a_refused_submission_is_a_one_line_error(error, shown, server, capsys):
    server(FakeJobServer({"submit_job": [error]}))
    code = main(["submit", "--mlflow-uri", URI, "--config", "default", "--model", "small_cnn", "--data", "digits",
                 "--job-id", "j"])
    assert code == 2 and capsys.readouterr().err == f"autorank: error: {shown}\n"


def test_submit_waits_for_an_agent_then_submits(server, tmp_path):
    """Ray's "No available agent" (agents registering after a node joined) is retried, not an error."""
    busy = RuntimeError("Request failed with status code 503: No available agent to submit job, please try again "
                        "later.")
    fake = server(FakeJobServer({"submit_job": [busy]}))
    assert jobs.submit_search(None, [], {}, out=str(tmp_path), mlflow_uri=URI, job_id="j") == "j"
    assert len(fake.submitted) == 1 and fake.fail["submit_job"] == []

    def always_busy() -> None:
        raise busy

    with pytest.raises(AutorankError, match="^Ray job server: Request failed with status code 503: No available"):
        jobs._submit_when_an_agent_is_up(always_busy, wait_s=0.0)


@pytest.mark.parametrize("command, method", [(["jobs"], "list_jobs"), (["jobs", "job-1"], "list_jobs"),
                                             (["logs", "job-1"], "get_job_logs"), (["stop", "job-1"], "stop_job")])
def test_job_server_errors_of_jobs_logs_and_stop_are_one_line(command, method, server, capsys):
    lost = ConnectionError("HTTPConnectionPool(host='head', port=8265): Max retries exceeded\nmore")
    server(FakeJobServer({method: [lost]}))
    assert main([*command, "--address", "http://head:8265"]) == 2
    assert capsys.readouterr().err == ("autorank: error: Ray job server: HTTPConnectionPool(host='head', "
                                       "port=8265): Max retries exceeded\n")
    server(FakeJobServer({method: [RuntimeError("Request failed with status code 500: internal\ntrace")]}))
    assert main([*command, "--address", "http://head:8265"]) == 2
    assert capsys.readouterr().err == "autorank: error: Ray job server: Request failed with status code 500: internal\n"


def test_a_local_checkpoint_is_copied_into_the_search_folder_before_the_search(server, tmp_path):
    """search.json then names OUT/weights.pt, not Ray's working directory (gone after the job, and on no
    other machine); a folder that already holds a search keeps its own checkpoint."""
    fake = server(FakeJobServer(keep=tmp_path / "ray"))
    checkpoint = tmp_path / "resnet.pt"
    checkpoint.write_bytes(b"the user's weights")
    assert main(["submit", "--mlflow-uri", URI, "--config", "default", "--model", "small_cnn", "--data", "digits",
                 "--weights", str(checkpoint), "--out", "$HOME/searches/x", "--job-id", "j"]) == 0
    entrypoint = fake.submitted[0]["entrypoint"]
    assert fake.submitted[0]["files"] == ["weights.pt"]
    assert '--weights "$HOME"/searches/x/weights.pt ' in entrypoint
    stage, search = entrypoint.split("python -m autorank search", 1)
    assert "weights.pt" in stage and "search.json" in stage   # the copy comes first

    home = tmp_path / "home"
    ran = subprocess.run(["sh", "-c", f"{stage}echo staged"], cwd=tmp_path / "ray" / "j", env={"HOME": str(home)},
                         capture_output=True, text=True, timeout=60)
    assert ran.stdout == "staged\n", ran.stderr
    assert (home / "searches" / "x" / "weights.pt").read_bytes() == b"the user's weights"

    (home / "searches" / "x" / "search.json").write_text("{}")
    (tmp_path / "ray" / "j" / "weights.pt").write_bytes(b"another job's weights")
    ran = subprocess.run(["sh", "-c", f"{stage}echo staged"], cwd=tmp_path / "ray" / "j", env={"HOME": str(home)},
                         capture_output=True, text=True, timeout=60)
    assert ran.stdout == "staged\n", ran.stderr
    assert (home / "searches" / "x" / "weights.pt").read_bytes() == b"the user's weights"


def test_fetch_points_the_study_and_the_travelled_checkpoint_at_the_copy(tmp_path):
    """What the job archived (Tune's ray/ aside) comes back, and search.json names the copies here."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("autorank", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    out = tmp_path / "head" / "x"
    (out / "ray").mkdir(parents=True)
    (out / "study.db").write_bytes(b"study")
    (out / "weights.pt").write_bytes(b"the user's weights")
    info = {"model": "small_cnn", "weights": str(out / "weights.pt"), "data": "digits",
            "storage": f"sqlite:///{out / 'study.db'}", "parent_run_id": run_id}
    (out / "search.json").write_text(json.dumps(info))
    assert jobs.archive_search(out, uri, "j") == run_id

    dest = jobs.fetch_search(uri, "j", tmp_path / "here" / "x")
    fetched = json.loads((dest / "search.json").read_text())
    assert sorted(p.name for p in dest.iterdir()) == ["search.json", "study.db", "weights.pt"]
    assert fetched["storage"] == f"sqlite:///{(dest / 'study.db').resolve()}"
    assert fetched["weights"] == str((dest / "weights.pt").resolve())
    assert Path(fetched["weights"]).read_bytes() == b"the user's weights"
    assert (fetched["model"], fetched["data"]) == ("small_cnn", "digits")

    info["weights"] = "https://example.org/resnet.pt"   # a checkpoint that did not travel stays as it was
    (out / "search.json").write_text(json.dumps(info))
    jobs.archive_search(out, uri, "k")
    dest = jobs.fetch_search(uri, "k", tmp_path / "there")
    assert json.loads((dest / "search.json").read_text())["weights"] == "https://example.org/resnet.pt"
