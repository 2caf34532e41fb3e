"""GPU resources on a real local Ray whose cluster has more GPUs than the machine it runs on.

Ray lets a node declare GPUs it does not have (`ray.init(num_gpus=N)`): here the cluster has
two GPUs more than this host, as a GPU cluster has GPUs its CPU head and CPU nodes lack. On it:
a job's resource check run inside a Ray task (a Tune trial's process) checks the cluster, not
the task's host; a sweep is sized by the autoscaler limits Ray's GCS records; and Ray hides a
node's other GPUs only from an actor that reserves one, which `panet predict --ray` relies on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
import torch

from pipeline.config import load_job_config

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"
HOST_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
DECLARED = HOST_GPUS + 2  # GPUs the cluster has


@pytest.fixture(scope="module")
def cluster() -> None:
    ray.init(num_cpus=2, num_gpus=DECLARED, include_dashboard=False)
    yield
    ray.shutdown()


def gpu_job(shards: dict[str, Path], storage: Path, workers: int):
    sets = {
        "data.train": str(shards["train"]),
        "data.val": str(shards["val"]),
        "checkpoint.storage_path": str(storage),
        "scaling.use_gpu": True,
        "scaling.num_workers": workers,
        "scaling.cpus_per_worker": 0.25,  # the GPUs, not the 2 CPUs, are what is checked
        "solver.ims_per_batch": workers,
    }
    return load_job_config(CONFIG, sets)


@ray.remote(num_cpus=0)
def checks_in_a_task(job, autoscaler_max) -> dict[str, str]:
    """The resource checks as a Tune trial's process runs them, on a node of the cluster."""
    from pipeline.train.preflight import check_resources, preflight

    os.environ.pop("RAY_ADDRESS", None)  # a trial's actor under `ray up` has none
    out = {}
    try:
        check_resources(job)  # this host's GPUs: what a trial was checked against before
        out["host"] = "ok"
    except ValueError as err:
        out["host"] = str(err)
    try:
        preflight(job, autoscaler_max=autoscaler_max)
        out["preflight"] = "ok"
    except ValueError as err:
        out["preflight"] = str(err)
    return out


def test_preflight_inside_ray_checks_the_cluster_not_the_host(cluster, shards, tmp_path) -> None:
    fits = ray.get(checks_in_a_task.remote(gpu_job(shards, tmp_path, DECLARED), {}))
    assert f"but this machine has {HOST_GPUS}" in fits["host"]  # the host check refuses it
    assert fits["preflight"] == "ok"  # the cluster holds it
    too_many = gpu_job(shards, tmp_path, DECLARED + 1)
    short = ray.get(checks_in_a_task.remote(too_many, {}))
    assert (
        f"config key 'scaling.use_gpu': {DECLARED + 1} workers need one GPU each"
        in (short["preflight"])
    )
    assert f"but the cluster has {DECLARED}" in short["preflight"]
    # The sweep driver's autoscaler limits travel with the trial: it waits for the GPU nodes.
    grown = ray.get(checks_in_a_task.remote(too_many, {"CPU": 96.0, "GPU": 16.0}))
    assert grown["preflight"] == "ok"


def test_a_gpu_sweep_is_sized_by_the_autoscaler_limits_in_the_gcs(cluster, tmp_path) -> None:
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from pipeline.ray_session import autoscaler_max_resources
    from pipeline.tune.runner import concurrency, prepare
    from pipeline.tune.sweep import base_job, expand, load_sweep

    sweep = load_sweep("table4")  # 5 trials
    sets = {
        "checkpoint.storage_path": str(tmp_path),
        "scaling.use_gpu": True,
        "scaling.cpus_per_worker": 0.25,
    }
    job, base = base_job(CONFIG, sets)
    p = prepare(sweep, expand(sweep), job, base)  # 2 GPU workers a trial
    assert autoscaler_max_resources() == {}  # a fixed cluster
    assert concurrency(p, ray.cluster_resources(), autoscaler_max_resources()) == 1
    # What an autoscaler that reports its node groups leaves in the GCS (Ray Train reads it too):
    # a GPU group of 0..1 nodes with 8 GPUs each.
    group = autoscaler_pb2.NodeGroupConfig(
        name="gpu", resources={"CPU": 48, "GPU": 8}, min_count=0, max_count=1
    )
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[group])
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        growable = autoscaler_max_resources()
        assert growable == {"CPU": 48.0, "GPU": 8.0}
        assert concurrency(p, ray.cluster_resources(), growable) == 4  # 8 GPUs / 2 a trial
    finally:
        _internal_kv_del(key, namespace=namespace)


@ray.remote(num_cpus=0)
class Replica:
    def visible(self) -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_only_a_replica_that_reserves_a_gpu_is_given_one_alone(cluster) -> None:
    from pipeline.predict.batch import replica_device

    device, gpus = replica_device("cuda", None)  # `panet predict --ray --device cuda`
    assert (device, gpus) == ("cuda", 1.0)
    reserving = [Replica.options(num_gpus=gpus).remote() for _ in range(2)]
    seen = ray.get([r.visible.remote() for r in reserving])
    assert len(set(seen)) == 2 and all(s and "," not in s for s in seen)  # one GPU each
    # Ray 2.60 leaves an actor that reserves no GPU with every GPU of its node: its cuda:0 is
    # whatever the node's first GPU is, the same for every such replica.
    bare = Replica.remote()
    assert ray.get(bare.visible.remote()) == os.environ.get("CUDA_VISIBLE_DEVICES")
    for actor in [*reserving, bare]:
        ray.kill(actor)
