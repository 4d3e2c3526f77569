"""Searches as Ray jobs on a cluster's head (Ray's Job Submission API), and their folders brought back.

`submit_search` packs the search's local inputs (the space YAML, a local checkpoint) into the job's
working directory and starts `autorank search --executor ray --ray-address auto` on the head, tracked
in a shared MLflow server (`autorank server`); the job's last step archives its search folder as the
artifact `search.tar.gz` of the search's MLflow run (tagged with the job id), so `fetch_search` can bring
it back to any machine that reaches the server. The Job API speaks HTTP to the head's dashboard
(port 8265); with Ray's token authentication on, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN reach it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shlex
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from autorank.errors import AutorankError

ARCHIVE = "search.tar.gz"
JOB_TAG = "autorank.job"
SEARCH_FILE = "search.json"   # the search folder's settings (autorank.search.results writes it)
SKIPPED = ("ray",)            # Tune's own folder: nothing a search reads back


def job_client(address: str | None) -> Any:
    """A JobSubmissionClient for the head's dashboard (`address`: http://HEAD:8265; None: RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise AutorankError(f"cannot reach the Ray job server at {address or os.environ.get('RAY_ADDRESS')}: "
                            f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _job_server() -> Iterator[None]:
    """The Job API's refusals (a duplicate job id, a working directory over Ray's size limit, a wrong
    token) and its lost connections, as one-line errors rather than tracebacks."""
    from ray.exceptions import RayError

    try:
        yield
    except (RuntimeError, ValueError, OSError, RayError) as exc:
        raise AutorankError(f"Ray job server: {_first_line(exc)}") from None


def submit_search(address: str | None, search_args: Sequence[str], files: dict[str, Path], *, out: str,
                  mlflow_uri: str, job_id: str, into_out: Sequence[str] = ()) -> str:
    """Start a search as a Ray job; returns its id. `search_args`: `autorank search` arguments naming the
    `files` (name in the working directory -> local file) by their names; `out`: the search folder on
    the head or shared storage, absolute or $HOME/... (expanded there). `into_out`: names of `files` the
    job copies into `out` before the search starts (the arguments then name them `OUT/NAME`): a
    checkpoint there outlives Ray's working directory and travels with the folder's archive."""
    if not (PurePosixPath(out).is_absolute() or out.startswith("$HOME/")):
        # a relative folder would resolve inside the job's working directory, Ray's temporary copy
        raise AutorankError(f"--out must be an absolute path on the head or $HOME/..., got {out!r}")
    if not mlflow_uri.startswith(("http://", "https://")):
        raise AutorankError(f"--mlflow-uri must be a tracking server every node reaches (autorank server), "
                            f"got {mlflow_uri!r}")
    client = job_client(address)
    with tempfile.TemporaryDirectory(prefix="autorank-job-") as folder:
        for name, path in files.items():
            shutil.copy2(path, Path(folder) / name)
        search = ["python", "-m", "autorank", "search", *search_args, "--out", out, "--mlflow-uri", mlflow_uri,
                  "--executor", "ray", "--ray-address", "auto", "--no-progress"]
        archive = ["python", "-m", "autorank.tracking.jobs", out, mlflow_uri, job_id]
        # the archive step runs whatever the search's outcome, and the job keeps the search's exit code
        entrypoint = f"{_stage(out, into_out)}{_shell(search)}; code=$?; {_shell(archive)}; exit $code"
        _submit_when_an_agent_is_up(lambda: client.submit_job(
            entrypoint=entrypoint, submission_id=job_id, runtime_env={"working_dir": folder},
            metadata={"autorank.out": out, "autorank.mlflow_uri": mlflow_uri}))
    return job_id


def _submit_when_an_agent_is_up(submit: Callable[[], Any], wait_s: float = 120.0) -> None:
    """Ray's job server answers "No available agent to submit job, please try again later" while the
    nodes' dashboard agents (re)register, e.g. just after a node joined or died: retry for `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with _job_server():
                submit()
            return
        except AutorankError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _stage(out: str, names: Sequence[str]) -> str:
    """The shell steps that copy working-directory files into the search folder ahead of the search
    (`&&`-ended), unless the folder already holds a search: that one's files stay as they are, and the
    search then refuses the folder."""
    if not names:
        return ""
    made = _shell(["mkdir", "-p", out])
    searched = _shell(["test", "-e", posixpath.join(out, SEARCH_FILE)])
    copies = " && ".join(_shell(["cp", name, posixpath.join(out, name)]) for name in names)
    return f"{made} && {{ {searched} || {{ {copies}; }}; }} && "


def _shell(argv: Sequence[str]) -> str:
    """Quoted for sh, except a leading $HOME (expanded on the head)."""
    return " ".join('"$HOME"' + shlex.quote(a[5:]) if a.startswith("$HOME/") else shlex.quote(a) for a in argv)


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """The cluster's jobs, oldest first: id, status, start time, entrypoint."""
    client = job_client(address)
    with _job_server():
        jobs = client.list_jobs()
    rows = [{"job": j.submission_id or j.job_id, "status": str(j.status.value if hasattr(j.status, "value") else j.status),
             "start": j.start_time, "end": j.end_time, "message": j.message, "entrypoint": j.entrypoint,
             "metadata": dict(j.metadata or {})} for j in jobs]
    return sorted(rows, key=lambda r: r["start"] or 0)


def job_status(address: str | None, job_id: str) -> dict[str, Any]:
    for row in list_jobs(address):
        if row["job"] == job_id:
            return row
    raise AutorankError(f"no job {job_id!r} on the cluster (autorank jobs lists them)")


def job_logs(address: str | None, job_id: str) -> str:
    job_status(address, job_id)
    client = job_client(address)
    with _job_server():
        return client.get_job_logs(job_id)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask Ray to stop the job: SIGTERM to its entrypoint's processes, the search and the archive step
    alike (the search resumes by hand on the head, docs/CLUSTER.md)."""
    job_status(address, job_id)
    client = job_client(address)
    with _job_server():
        return bool(client.stop_job(job_id))


def archive_search(out: Path, mlflow_uri: str, job_id: str) -> str:
    """In the job, after the search: its folder (Tune's own files aside) as `search.tar.gz` of the search's
    MLflow run, tagged with the job id; returns the run id."""
    from mlflow import MlflowClient

    info = json.loads((out / SEARCH_FILE).read_text())
    run_id = info.get("parent_run_id")
    if run_id is None:
        raise AutorankError(f"the search at {out} was not tracked in MLflow: nothing to archive")
    client = MlflowClient(mlflow_uri)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ARCHIVE
        with tarfile.open(path, "w:gz") as tar:
            for item in sorted(out.iterdir()):
                if item.name not in SKIPPED:
                    tar.add(item, arcname=item.name)
        client.log_artifact(run_id, str(path))
    client.set_tag(run_id, JOB_TAG, job_id)
    return run_id


def fetch_search(mlflow_uri: str, job_id: str, dest: Path, experiment: str = "autorank") -> Path:
    """A job's search folder from the MLflow server into `dest` (new), its study and a checkpoint that
    travelled in the folder (`submit_search`'s `into_out`) pointed at the copies, so `autorank best`,
    `export` and `search --resume` work on it here."""
    from mlflow import MlflowClient

    if dest.exists() and any(dest.iterdir()):
        raise AutorankError(f"{dest} exists and is not empty: choose another --to")
    client = MlflowClient(mlflow_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'",
                              max_results=1) if found is not None else []
    if not runs:
        raise AutorankError(f"no archived search of job {job_id!r} in {mlflow_uri} (experiment {experiment!r}): "
                            "it has not finished yet, or ran elsewhere")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        archive = client.download_artifacts(runs[0].info.run_id, ARCHIVE, folder)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    info = json.loads((dest / SEARCH_FILE).read_text())
    storage = info.get("storage", "")
    if storage.startswith("sqlite:///") and Path(storage.removeprefix("sqlite:///")).name == "study.db":
        where = Path(storage.removeprefix("sqlite:///")).parent   # the folder the search ran in
        info["storage"] = f"sqlite:///{(dest / 'study.db').resolve()}"   # the study travelled with the folder
        weights = Path(info["weights"]) if info.get("weights") else None
        if weights is not None and weights.is_relative_to(where) and (dest / weights.relative_to(where)).is_file():
            info["weights"] = str((dest / weights.relative_to(where)).resolve())   # and so did this checkpoint
    (dest / SEARCH_FILE).write_text(json.dumps(info, indent=2))
    return dest


if __name__ == "__main__":  # the job's last step: python -m autorank.tracking.jobs OUT MLFLOW_URI JOB_ID
    import sys

    print(f"autorank: archived the search as {ARCHIVE} of MLflow run "
          f"{archive_search(Path(sys.argv[1]).expanduser(), sys.argv[2], sys.argv[3])}")
