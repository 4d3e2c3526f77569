"""Failures on the cluster: the worker node lost mid-trial, and `kill -9` of the driver then `--resume`.

Losing the worker node records its running trial as failed (Tune does not retry it) and the search
completes on a new worker node; killing the driver loses and repeats nothing: the study and MLflow
agree trial for trial after `--resume` (`assert_study_and_mlflow_agree`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.cluster.cluster import cluster_search_args, run
from tests.reliability.searches import assert_study_and_mlflow_agree, kill_group, trial_states, wait_for, write_space


def start_search(cluster, args: list[str], log) -> subprocess.Popen:
    """The driver in its own process group (so a kill takes whatever it started)."""
    return subprocess.Popen([sys.executable, "-m", "autorank", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=cluster.env(), cwd=cluster.root, start_new_session=True)


def test_losing_the_worker_node_mid_trial_records_it_failed_and_the_search_completes(cluster, tmp_path):
    from autorank.search import load_search

    trials = 3  # one is lost with the node, the others complete on the new one (with 2, both ended before a
                # `ray list` under load saw one running)
    out, log = cluster.driver_root / "lost-worker", tmp_path / "search.log"
    # ~10 s of fine-tuning per trial on a worker's thread, so that the kill lands mid-trial: with 4 steps, on an
    # idle fast host the trial seen running ended before the worker died and no trial failed
    space = write_space(tmp_path, name="lost", trials=trials, steps=2000)
    args = cluster_search_args(cluster, space, out, trials=trials)
    args[args.index("--max-concurrent") + 1] = "1"
    proc = start_search(cluster, args, log)
    try:
        def trial_on_the_worker():
            """a trial running in an actor on the worker node"""
            return cluster.list("actors", "class_name=ImplicitFunc", "state=ALIVE")

        wait_for(trial_on_the_worker, 400, proc, log, poll_s=1)
        running = {n for n, s in trial_states(out).items() if s == "running"}
        cluster.kill_worker()
        cluster.start_worker()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        kill_group(proc)
    search = load_search(out)
    failed = [t for t in search.trials if t.state == "failed"]
    assert [t.number for t in failed] == sorted(running) and len(failed) == 1
    assert "Ray worker" in failed[0].reason and not failed[0].has_weights
    assert_study_and_mlflow_agree(out, trials)


def test_kill9_of_the_driver_then_resume_loses_and_repeats_nothing(cluster, tmp_path):
    from autorank.search import load_search

    trials = 3
    out, log = cluster.driver_root / "killed-driver", tmp_path / "search.log"
    space = write_space(tmp_path, name="killed", trials=trials, steps=4)
    args = cluster_search_args(cluster, space, out, trials=trials)
    proc = start_search(cluster, args, log)
    try:
        def one_done_one_running():
            """a finished trial (to be kept) and a running one (to be repeated)"""
            states = trial_states(out)
            done = sum(s in ("complete", "failed") for s in states.values())
            return states if done >= 1 and "running" in states.values() else None

        wait_for(one_done_one_running, 600, proc, log)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as the OOM killer or `kill -9` would
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    before = {t.number: t for t in load_search(out).trials}
    resumed = run(cluster, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = {t.number: t for t in load_search(out).trials}
    assert any(t.counted for t in before.values()) and any(t.state == "running" for t in before.values())
    for number, trial in before.items():
        if trial.counted:  # kept once, unchanged
            assert after[number].state == trial.state and after[number].metrics == trial.metrics
        elif trial.state == "running":  # interrupted, its choices ran again
            assert after[number].state == "interrupted"
            assert any(trial.params.items() <= t.params.items() and t.counted for t in after.values()
                       if t.number > number)
    assert_study_and_mlflow_agree(out, trials)
    # the trial actors the killed driver owned were ended by Ray: none is left alive
    deadline = time.monotonic() + 60
    while cluster.list("actors", "class_name=ImplicitFunc", "state=ALIVE") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not cluster.list("actors", "class_name=ImplicitFunc", "state=ALIVE")
