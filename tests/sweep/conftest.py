"""One local Ray cluster (2 CPUs, small object store, no dashboard) for the whole session, started by the
first test that asks for it: starting one costs seconds."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
