"""One real two-node Ray cluster (tests/cluster/cluster.py) for the whole cluster suite.

It is started once (about a minute on CI's two cores) and stopped after the last cluster test, not at
the session's end (two idle Ray nodes would take CPU and memory from the rest of the suite), every Ray
process of both nodes killed by process id; a test that kills the worker node starts a new one before
it ends.
The tests skip, saying why, only where this machine cannot build the cluster (no mount namespaces).
"""

from __future__ import annotations

import pytest

from tests.cluster.cluster import Cluster, missing_requirement

_RUNNING: list[Cluster] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ray")
    drivers = tmp_path_factory.mktemp("drivers")
    running = Cluster(root=root, driver_root=drivers)
    _RUNNING.append(running)
    try:
        yield running.start()
    finally:
        _stop_running()


def _stop_running() -> None:
    while _RUNNING:
        _RUNNING.pop().stop()


def _in_cluster_suite(item: pytest.Item) -> bool:
    return item.path.parent.name == "cluster" and item.path.parent.parent.name == "tests"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last cluster test's own teardown: the rest of the suite runs without the idle nodes."""
    if nextitem is None or not _in_cluster_suite(nextitem):
        _stop_running()


def pytest_collection_modifyitems(config, items) -> None:
    """The tests that kill a node run after the other cluster tests, so that each of the others starts
    on a cluster that has never lost a node (what they check does not depend on an earlier test's kill)."""
    cluster = [i for i, item in enumerate(items) if _in_cluster_suite(item)]
    if not cluster:
        return
    group = [items[i] for i in cluster]
    ordered = [item for item in group if item.path.name != "test_cluster_failures.py"] + \
              [item for item in group if item.path.name == "test_cluster_failures.py"]
    for index, item in zip(cluster, ordered):
        items[index] = item
