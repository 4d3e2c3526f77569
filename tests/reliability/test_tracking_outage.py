"""The tracking server goes away during a search.

1. It comes back before the search ends: the trials finished meanwhile are written once it is
   back, exactly once each.
2. It stays down until the end: the search still finishes every trial, keeps them in the study,
   says how to resume, and `--resume` (server back) writes the missing ones exactly once.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from autorank.cli.ui import ServerConfig, start_server, stop_server
from tests.reliability.searches import (assert_study_and_mlflow_agree, mlflow_trial_runs, run_cli, start_cli,
                                        trial_states, wait_for, write_space)


@pytest.mark.slow
def test_server_outage_during_and_at_the_end_of_a_search_loses_nothing(tmp_path):
    cfg = ServerConfig(port=0, data_dir=tmp_path / "server")
    url = start_server(cfg)["url"]
    out, log = tmp_path / "search", tmp_path / "search.log"
    space = write_space(tmp_path, trials=5, steps=6)
    proc = start_cli(["search", "--config", str(space), "--model", "small_cnn", "--data", "digits", "--out", str(out),
                      "--mlflow-uri", url, "--no-progress"], log)
    try:
        def first_trial_run():
            """the first trial's run in MLflow"""
            if not (out / "search.json").exists():
                return False
            return mlflow_trial_runs(url, json.loads((out / "search.json").read_text())["search_id"])

        wait_for(first_trial_run, 300, proc, log)
        # 1. the server dies (SIGKILL: no graceful shutdown) while that trial is being logged
        os.killpg(json.loads((cfg.data_dir / "server.json").read_text())["pid"], signal.SIGKILL)
        stop_server(cfg)
        done_at_outage = sum(s in ("complete", "failed") for s in trial_states(out).values())

        def two_more_finished():
            """two more trials finished while MLflow is down"""
            return sum(s in ("complete", "failed") for s in trial_states(out).values()) >= done_at_outage + 2

        wait_for(two_more_finished, 300, proc, log)
        start_server(cfg)  # back on the same address
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        assert_study_and_mlflow_agree(out, 5)

        # 2. down at the end: finishes, keeps everything in the study, says how to resume
        stop_server(cfg)
        extended = run_cli(["search", "--resume", "--out", str(out), "--trials", "7", "--no-progress"])
        assert extended.returncode == 0, extended.stderr[-3000:]
        assert "--resume" in extended.stderr and "safe in the study" in extended.stderr
        assert sum(s in ("complete", "failed") for s in trial_states(out).values()) == 7
        start_server(cfg)
        replayed = run_cli(["search", "--resume", "--out", str(out), "--trials", "7", "--no-progress"])
        assert replayed.returncode == 0, replayed.stderr[-3000:]
        assert_study_and_mlflow_agree(out, 7)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_server(cfg)
