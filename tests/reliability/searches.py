"""Helpers for the reliability suite: tiny real searches on digits, and cross-checks between the
Optuna study (the source of truth) and the MLflow store that mirrors it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

POISONED = "module:tests.reliability.fixtures:poisoned_cnn"

# Small but real: every trial decomposes, fake-quantizes, fine-tunes and evaluates small_cnn on digits.
FAST_SPACE = """\
name: {name}
methods: [none, tucker2, svd]
precisions: [fp32, int8]
constraints:
  max_drop: 50.0
finetune:
  steps: {steps}
  batch_size: 32
search:
  sampler: random
  trials: {trials}
  seed: 0
"""


def write_space(folder: Path, name: str = "rel", trials: int = 6, steps: int = 4) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(FAST_SPACE.format(name=name, trials=trials, steps=steps))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI search: repo importable, MLflow's HTTP retries short for tests."""
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", **extra}


def start_cli(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`autorank ARGS` in its own process group (so a kill takes its Ray helpers too)."""
    return subprocess.Popen([sys.executable, "-m", "autorank", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=cli_env(**env), cwd=log.parent, start_new_session=True)


def run_cli(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autorank", *args], capture_output=True, text=True,
                          env=cli_env(**env), timeout=timeout, cwd=REPO)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def trial_states(out: Path) -> dict[int, str]:
    """Trial number -> state, read from the study while a search may still be writing it."""
    if not (out / "search.json").exists() or not (out / "study.db").exists():
        return {}
    from autorank.search import load_search

    try:
        return {t.number: t.state for t in load_search(out).trials}
    except Exception:  # noqa: BLE001 - the study may not exist yet in a fresh storage
        return {}


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
             poll_s: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the search exited ({proc.returncode}) early:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout}s waiting for {condition.__doc__ or condition}")


def mlflow_trial_runs(uri: str, search_id: str) -> list:
    """All active trial runs of a search in MLflow (duplicates included, to be caught)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("autorank")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`autorank.search_id` = '{search_id}'"
                              " and tags.`autorank.kind` = 'trial'", max_results=1000)
    return list(runs)


def assert_study_and_mlflow_agree(out: Path, expected_trials: int, mlflow_uri: str | None = None) -> list:
    """Every finished trial is in the study once and in MLflow exactly once, with the same figures."""
    from autorank.search import load_search
    from autorank.records import pareto_front

    search = load_search(out)
    counted = [t for t in search.trials if t.counted]
    assert len(counted) == expected_trials, [(t.number, t.state) for t in search.trials]
    assert len({t.number for t in counted}) == expected_trials
    runs = mlflow_trial_runs(mlflow_uri or search.info["mlflow_uri"], search.info["search_id"])
    numbers = [int(r.data.tags["autorank.trial"]) for r in runs]
    assert sorted(numbers) == sorted(t.number for t in counted), "MLflow trial runs differ from the study's"
    by_number = {int(r.data.tags["autorank.trial"]): r for r in runs}
    for trial in counted:
        run = by_number[trial.number]
        assert run.info.status == ("FAILED" if trial.state == "failed" else "FINISHED")
        if trial.state == "complete":
            assert run.data.metrics["accuracy"] == pytest.approx(trial.metrics["accuracy"])
            assert run.data.metrics["size_bytes"] == pytest.approx(trial.metrics["size_bytes"])
        elif trial.state == "failed":
            assert run.data.tags["reason"] == trial.reason
        else:  # screened out: its zero-shot figures
            assert run.data.metrics["screen_accuracy"] == pytest.approx(trial.screen["accuracy"])
    front = {t.number for t in pareto_front(search.trials, search.space.objectives)}
    assert {n for n, r in by_number.items() if r.data.tags.get("pareto") == "true"} == front
    return counted
