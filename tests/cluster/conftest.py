"""One real two-node Ray cluster (tests/cluster/cluster.py) for the whole cluster suite.

It is started once (about a minute on CI's two cores) and stopped at the end, every Ray process of
both nodes killed by process id; a test that kills the worker node starts a new one before it ends.
The tests skip, saying why, only where this machine cannot build the cluster (no mount namespaces).
"""

from __future__ import annotations

import pytest

from tests.cluster.cluster import Cluster, missing_requirement


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ray")
    drivers = tmp_path_factory.mktemp("drivers")
    running = Cluster(root=root, driver_root=drivers)
    try:
        yield running.start()
    finally:
        running.stop()


def pytest_collection_modifyitems(config, items) -> None:
    """The tests that kill a node run after the other cluster tests, so that each of the others starts
    on a cluster that has never lost a node (what they check does not depend on an earlier test's kill)."""
    cluster = [i for i, item in enumerate(items) if item.path.parent.name == "cluster" and item.path.parent.parent.name == "tests"]
    if not cluster:
        return
    group = [items[i] for i in cluster]
    ordered = [item for item in group if item.path.name != "test_cluster_failures.py"] + \
              [item for item in group if item.path.name == "test_cluster_failures.py"]
    for index, item in zip(cluster, ordered):
        items[index] = item
