"""A search on a real two-node Ray cluster: its trials run on the worker node, which cannot write the
driver's folder, and every file of theirs reaches the driver (the weights of the front included)."""

from __future__ import annotations

import json

from tests.cluster.cluster import cluster_search_args, run
from tests.reliability.searches import write_space

TRIALS = 4


def test_search_on_the_cluster_brings_every_trial_file_to_the_driver_and_exports(cluster, tmp_path):
    from autorank.records import pareto_front
    from autorank.search import load_search

    out = cluster.driver_root / "search"
    space = write_space(tmp_path, name="cluster", trials=TRIALS, steps=4)
    earlier = {a["actor_id"] for a in cluster.list("actors", "class_name=ImplicitFunc")}  # other tests' trials
    searched = run(cluster, cluster_search_args(cluster, space, out, TRIALS))
    assert searched.returncode == 0, searched.stderr[-4000:]

    # the trials ran on the worker node (the only one with the custom resource) ...
    trial_actors = [a for a in cluster.list("actors", "class_name=ImplicitFunc") if a["actor_id"] not in earlier]
    assert len(trial_actors) >= TRIALS and {a["node_id"] for a in trial_actors} == {cluster.worker_node_id()}
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
