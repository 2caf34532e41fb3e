"""Fixtures shared by the test packages.

The session's servers: one S3-compatible server (`s3_env`), one `mlflow server` storing its
artifacts there (`mlflow_uri`) and one two-node token-authenticated Ray cluster
(`token_cluster`) for the submit and multi-node tests. A test that stops or breaks a
server starts its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SLOT = "train_slot"  # one unit on each node of `token_cluster`: 2 train workers land on 2 nodes
# How soon the GCS declares a hung node dead: a health check every second, each given 2 s to
# answer, dead after 5 misses in a row: ~15 s (Ray 2.60's defaults: 3 s, 10 s, 5 misses: ~65 s).
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on `token_cluster` run last, together, in their order: while that cluster is up,
    a local Ray instance of another test would be one of two on the machine, and Ray Train's
    placement-group cleaner, which looks for *the* local instance, would fail."""
    on_cluster = [i for i in items if "token_cluster" in getattr(i, "fixturenames", ())]
    if on_cluster:
        rest = [i for i in items if "token_cluster" not in getattr(i, "fixturenames", ())]
        items[:] = rest + on_cluster


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic data set converted to shards: 24 training and 8 validation images."""
    from pipeline.demo import ensure_shards

    root = tmp_path_factory.mktemp("data")
    return {
        "train": ensure_shards(root / "raw", root / "shards", "train", 24, 0),
        "val": ensure_shards(root / "raw", root / "shards", "val", 8, 1),
    }


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The session's S3-compatible server (bucket `panet`): the AWS variables that reach it.
    They are not set in this process: a test that needs them sets them (monkeypatch)."""
    from tests.s3_server import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory, s3_env: dict[str, str]) -> Iterator[str]:
    """The session's `mlflow server`: SQLite, artifacts proxied to `s3://panet/mlflow`. Its
    tests keep apart by experiment, job and model names."""
    from tests.mlflow_server import mlflow_server

    with mlflow_server(
        tmp_path_factory.mktemp("mlflow"), timeout=300, artifacts="s3://panet/mlflow", env=s3_env
    ) as uri:
        yield uri


@pytest.fixture(scope="session")
def token_cluster() -> Iterator[object]:
    """Two Ray nodes on this machine (3 + 2 logical CPUs, one `SLOT` each), token auth on.

    A test that stops a node starts it again (`tests/ray_cluster.Nodes.restore`)."""
    from tests.ray_cluster import NodeSpec, ray_cluster

    with ray_cluster(
        num_cpus=3,
        resources={SLOT: 1},
        extra_nodes=[NodeSpec(num_cpus=2, resources={SLOT: 1})],
        timeout=300,  # a loaded 2-core machine starts a node in ~30-90 s
        system_env=HEALTH_CHECKS,
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def restartable_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """An `mlflow server` of the module's own, which its tests stop and start again (same port
    and store; `tests/mlflow_server.RestartableServer`)."""
    from tests.mlflow_server import RestartableServer

    s = RestartableServer(tmp_path_factory.mktemp("mlflow_outage"))
    s.start()
    yield s
    s.stop()
