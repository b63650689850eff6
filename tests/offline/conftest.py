"""A two-node Ray cluster on loopback, shared by the fleet and MNTD tests (started on first use)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def two_node_ray() -> Iterator[object]:
    """A head and a worker node of one CPU each (``ray.cluster_utils.Cluster``), this process connected."""
    ray = pytest.importorskip("ray", reason="the fleet extra (ray) is not installed")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every listener on 127.0.0.1
    Path("/tmp/ray").mkdir(exist_ok=True)  # Ray writes /tmp/ray/ray_current_cluster whatever temp_dir says
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths live under it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
