"""A search on a real two-node Ray cluster: its trials run on the worker node, which cannot write the
driver's folder, and every file of theirs reaches the driver (the weights of the front included)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tests.cluster.cluster import cluster_search_args, run
from tests.reliability.searches import write_space

TRIALS = 4


def trial_actor(pid: int) -> bool:
    """A Ray worker process running a Tune trial actor (Ray titles it `ray::ImplicitFunc...`)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc")
    except OSError:
        return False


def test_search_on_the_cluster_brings_every_trial_file_to_the_driver_and_exports(cluster, tmp_path):
    from autorank.records import pareto_front
    from autorank.search import load_search

    out = cluster.driver_root / "search"
    space = write_space(tmp_path, name="cluster", trials=TRIALS, steps=4)
    # which node runs the trial actors, seen from /proc while the search runs (Ray's list of dead
    # actors is not kept for long enough to ask afterwards)
    seen: dict[str, set[int]] = {"head": set(), "worker": set()}
    done_event = threading.Event()

    def watch() -> None:
        while not done_event.wait(0.2):
            for name, node in (("head", cluster.head), ("worker", cluster.worker)):
                seen[name] |= {pid for pid in node.pids() if trial_actor(pid)}

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        searched = run(cluster, cluster_search_args(cluster, space, out, TRIALS))
    finally:
        done_event.set()
        watcher.join()
    assert searched.returncode == 0, searched.stderr[-4000:]

    # the trials ran on the worker node (the only one with the custom resource), one actor each ...
    assert len(seen["worker"]) >= TRIALS and not seen["head"], seen
    # ... and every file they produced is in the driver's folder, written by the driver
    search = load_search(out)
    done = [t for t in search.trials if t.counted]
    assert len(done) == TRIALS and all(t.state == "complete" for t in done), [(t.number, t.reason) for t in done]
    for trial in done:
        folder = out / "trials" / str(trial.number)
        assert json.loads((folder / "metrics.json").read_text())["metrics"] == trial.metrics
        assert json.loads((folder / "plan.json").read_text()) == trial.plan
    front = pareto_front(search.trials, search.space.objectives, feasible_only=False)
    assert front and all(t.has_weights for t in front)

    exported = run(cluster, ["export", "--search", str(out), "--precision", "fp32", "--out", str(tmp_path / "best.onnx"),
                             "--threads", "1", "--no-bench", "--no-register", "--json"])
    assert exported.returncode == 0, exported.stderr[-4000:]
    result = json.loads(exported.stdout)
    assert result["trial"] in {t.number for t in front}
    assert result["verification"]["top1_agreement"] >= 0.99
