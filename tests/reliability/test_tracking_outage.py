"""The tracking server goes away during a search.

1. It is killed while a trial is being logged and comes back: the trials finished meanwhile are
   written once it is back (by the running search, or by `--resume` if the search ended first),
   each exactly once, the half-written run of the crash included.
2. It stays down until the end: the search still finishes every trial, keeps them in the study,
   says how to resume, and `--resume` (server back) writes the missing ones exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest

from autorank.tracking.server import ServerConfig, start_server, stop_server
from tests.reliability.searches import (assert_study_and_mlflow_agree, mlflow_trial_runs, run_cli, start_cli,
                                        trial_states, wait_for, write_space)


@contextlib.contextmanager
def _search_with_server(tmp_path, trials: int):
    """A tracking server and a CLI search logging to it; both are gone afterwards, whatever happened."""
    cfg = ServerConfig(port=0, data_dir=tmp_path / "server")
    url = start_server(cfg)["url"]
    out, log = tmp_path / "search", tmp_path / "search.log"
    space = write_space(tmp_path, trials=trials, steps=6)
    proc = start_cli(["search", "--config", str(space), "--model", "small_cnn", "--data", "digits", "--out", str(out),
                      "--mlflow-uri", url, "--no-progress"], log)
    try:
        yield cfg, url, proc, out, log
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_server(cfg)


def _finished(out) -> int:
    return sum(s in ("complete", "failed") for s in trial_states(out).values())


@pytest.mark.slow
def test_server_killed_while_a_trial_is_logged_then_back_loses_and_repeats_nothing(tmp_path):
    with _search_with_server(tmp_path, trials=5) as (cfg, url, proc, out, log):
        def a_trial_being_logged():
            """a trial run created but not yet terminated"""
            if not (out / "search.json").exists():
                return False
            runs = mlflow_trial_runs(url, json.loads((out / "search.json").read_text())["search_id"])
            return any(run.info.status == "RUNNING" for run in runs)

        wait_for(a_trial_being_logged, 300, proc, log, poll_s=0.05)
        # the server dies (SIGKILL: no graceful shutdown) while that trial is being logged
        os.killpg(json.loads((cfg.data_dir / "server.json").read_text())["pid"], signal.SIGKILL)
        stop_server(cfg)
        done_at_outage = _finished(out)

        def two_more_finished_or_search_ended():
            """two more trials finished while MLflow is down (or the whole search did)"""
            return _finished(out) >= done_at_outage + 2 or proc.poll() is not None

        wait_for(two_more_finished_or_search_ended, 300)
        start_server(cfg)  # back on the same address
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        assert _finished(out) == 5
        if "safe in the study" in log.read_text():  # it ended before the server was back: replay
            replayed = run_cli(["search", "--resume", "--out", str(out), "--no-progress"])
            assert replayed.returncode == 0, replayed.stderr[-3000:]
        assert_study_and_mlflow_agree(out, 5)


@pytest.mark.slow
def test_server_down_at_the_end_keeps_everything_in_the_study_and_resume_logs_it(tmp_path):
    with _search_with_server(tmp_path, trials=4) as (cfg, _, proc, out, log):
        wait_for(lambda: _finished(out) >= 2, 300, proc, log)
        stop_server(cfg)  # graceful stop between two trials' logging, and it stays down
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        log_text = log.read_text()
        assert "safe in the study" in log_text and f"autorank search --resume --out {out}" in log_text
        assert _finished(out) == 4
        start_server(cfg)
        replayed = run_cli(["search", "--resume", "--out", str(out), "--no-progress"])
        assert replayed.returncode == 0, replayed.stderr[-3000:]
        assert_study_and_mlflow_agree(out, 4)
