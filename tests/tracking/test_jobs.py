"""The Ray job client side of `autorank submit / jobs / logs / stop / fetch`, without a cluster: the job
server is a fake client object (Ray's JobSubmissionClient's methods, raising as Ray's does); the real
cluster runs in tests/cluster/test_cluster_jobs.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import autorank.tracking.jobs as jobs
from autorank.cli import main
from autorank.errors import AutorankError

URI = "http://127.0.0.1:5000"


class FakeJobServer:
    """Records what was submitted (and a copy of the working directory, gone once submit returns);
    `fail` maps a method name to the errors it raises, one per call, before it answers."""

    def __init__(self, fail: dict[str, list[Exception]] | None = None):
        self.fail = fail or {}
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


@pytest.mark.parametrize("out", ["/srv/searches/x", "$HOME/autorank-jobs/x"])
def test_submit_takes_an_absolute_or_home_out(out, server):
    fake = server(FakeJobServer())
    assert jobs.submit_search(None, ["--config", "default"], {}, out=out, mlflow_uri=URI, job_id="j") == "j"
    assert fake.submitted[0]["metadata"]["autorank.out"] == out
