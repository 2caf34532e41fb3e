"""The one place that joins a Ray cluster or starts a local instance: train, eval, tune, predict.

One policy (`connect`): a process already connected stays as it is; else it joins the cluster
at the given address (`ray.address`) or RAY_ADDRESS; else it starts a local instance with at
least the logical CPUs its workers and Ray Data tasks need, and the local settings of
`local_ray_env`. Either way the driver's expected noise is switched off first
(`pipeline.quiet`).

Also here, because every job that starts Ray workers needs them: the runtime env of those
workers (`worker_env`) and what the connected cluster's autoscaler can grow to
(`autoscaler_max_resources`), which workers are checked against before they are asked for.
Ray is imported inside the functions: importing this module starts nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import yaml
from ray._private import ray_constants
from ray._private import state as ray_state
from ray.dashboard.utils import get_address_for_submission_client

from pipeline.quiet import quiet_driver

# Worker processes the raylet keeps before it kills idle ones (Ray's default: the CPU count).
MIN_WORKERS_SOFT_LIMIT = 32
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients find the dashboard
# oneDNN (PyTorch's CPU convolutions) keeps 1,024 compiled primitives by default. Detection
# batches vary in padded size and RoI count (a tiny run meets ~8,000 distinct primitives), so
# that cache evicts them before they come back and re-creates ~135 every step: 3-7% of a CPU
# step (docs/design.md). Primitives are ~40 KB each; GPU runs do not use them. The env of
# the driver wins.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 16384
# The cluster launcher's autoscaling config, on the head node (`ray up` writes it there).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
# Ray's switch between a node other machines can join and a local-only one (its default on
# macOS and Windows): set to 1, a local instance listens on this machine's network address too.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(
    address: str = "", *, num_cpus: int = 0, min_cpus: float = 1, state_api: bool = False
) -> None:
    """Join `address` (or RAY_ADDRESS), or start a local instance; a connected process stays.

    Args:
        address: the cluster to join (`ray.address`); "" for RAY_ADDRESS, and without it a
            local instance.
        num_cpus: a local instance's logical CPUs exactly (`ray.num_cpus`); 0 for this
            machine's cores, raised to `min_cpus`.
        min_cpus: what the caller's workers and its Ray Data tasks need together. On a 2-core
            machine, 2 train workers holding 1 CPU each would leave Ray Data no slot and the
            run would hang: a local instance gets more logical CPUs than it has cores then.
        state_api: every process of the job must find the dashboard's state API (a sweep:
            Ray Train's placement group cleaner asks it whether a stopped trial's controller
            is alive, and looks for *the* Ray instance of its machine without
            `RAY_API_SERVER_ADDRESS`, which fails where several run). A local instance then
            starts with its dashboard on a free port.
    """
    quiet_driver()
    keep_working_directory()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        start_local(local_cpus(num_cpus, min_cpus), state_api=state_api)
    elif state_api:
        url = get_address_for_submission_client(address)
        os.environ[API_SERVER_ENV] = url
        ray.init(address=address, runtime_env={"env_vars": {API_SERVER_ENV: url}})
    else:
        ray.init(address=address)


def local_cpus(num_cpus: int, min_cpus: float) -> int:
    """A local instance's logical CPUs: `num_cpus` if set, else the cores raised to `min_cpus`."""
    return num_cpus or math.ceil(max(os.cpu_count() or 1, min_cpus))


def start_local(num_cpus: int, *, state_api: bool = False) -> str:
    """Start a local Ray instance of `num_cpus` logical CPUs with the settings of `local_ray_env`.

    Args:
        num_cpus: logical CPUs.
        state_api: start the dashboard on a free port and tell every process where (see
            `connect`).

    Returns:
        The dashboard's URL with `state_api`, else "".
    """
    local_ray_env(num_cpus)
    if not state_api:
        with loopback_node():
            ray.init(num_cpus=num_cpus)
        return ""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    os.environ[API_SERVER_ENV] = url  # the raylet and every worker inherit it
    with loopback_node():
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {API_SERVER_ENV: url}},
        )
    return url


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Within: a local instance started by `ray.init` gets 127.0.0.1 as its node address.

    On Linux Ray gives a node the machine's network address (even for `--node-ip-address
    127.0.0.1`), and binds to it or to every interface: the GCS, raylet and worker gRPC
    servers, the dashboard agent, runtime-env agent and metrics exporter. A node whose address
    is 127.0.0.1 binds all of them to the loopback (the dashboard is on 127.0.0.1 either way).
    Ray's local-only mode gives it that address; Ray reads the switch once, at import, so it
    is set here for the start and put back after. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1` keeps
    the network address.
    """
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(LOCAL_ONLY_ENV, False)
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def local_ray_env(num_cpus: int) -> dict[str, str]:
    """Set a local instance's settings in `os.environ`; returns the ones in effect.

    They go in the environment before `ray.init` starts the instance, so its raylet and every
    worker read them. A variable the user set wins; a cluster's own settings are left alone.
    """
    settings = {
        # One machine has no preemptible nodes; the watcher's actor logs an error-level
        # `core_worker.cc ... PreemptionWatcher` line at every start. Read by the Train controller.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # A run starts a dozen actors; with the soft limit at the CPU count (4 here) the raylet
        # kills the idle Ray Data task workers of a finished run, and in a sweep the next trial
        # started its data pipeline in new processes (about 4 s a trial on 2 cores).
        "RAY_num_workers_soft_limit": str(max(num_cpus, MIN_WORKERS_SOFT_LIMIT)),
    }
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in settings}


def keep_working_directory() -> None:
    """Leave a working directory that was deleted under the driver for one that exists.

    Paths are absolute from `load_job_config` on, so nothing of the job's needs the working
    directory, but MLflow's SQLite store resolves its default artifact root against it. Under
    `ray job submit` the driver runs in the unpacked working_dir package, and on two Ray nodes
    sharing one temp dir (two raylets on one machine), the second node's runtime-env agent
    unpacks the same package again when the driver connects, deleting the first copy.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(tempfile.gettempdir())
        print(
            f"[panet] warning: the working directory was deleted; going on in "
            f"{tempfile.gettempdir()} (every path of the job is absolute)",
            flush=True,
        )


def use_worker_onednn_cache() -> None:
    """Give this process the workers' oneDNN cache (loops outside Ray: the benchmarks).

    oneDNN reads the variable once, at the process's first convolution: call before it.
    """
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_CAPACITY))


def worker_env() -> dict[str, Any]:
    """The runtime env of every train and eval worker."""
    return {
        "env_vars": {
            # Ray Train V2 turns print() on workers into log records *and* tees it to stdout
            # (twice on the driver), and defeats redirect_stdout (pycocotools' chatter leaks).
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            ONEDNN_CACHE_ENV: os.environ.get(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_CAPACITY)),
        }
    }


def autoscaler_max_resources() -> dict[str, float]:
    """The most the connected cluster's autoscaler can add up to; {} for a fixed-size cluster.

    First Ray's own record, the cluster config in the GCS (node groups x their max replicas),
    which Ray Train's worker-group check reads. Ray 2.60's autoscalers (v1 and v2) never write it
    (nothing in Ray calls the GCS client's `report_cluster_config`), so on the shipped clusters
    the autoscaling config is read where the head node has it: the cluster launcher's
    `~/ray_bootstrap_config.yaml`, or KubeRay's RayCluster, read with the head pod's service
    account and converted by Ray's own KubeRay autoscaler code. Elsewhere (a worker node) only
    Ray's record answers: a Tune trial gets its driver's answer (`preflight_resources`).
    """
    try:
        found = ray_state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state: treat as fixed
        found = None
    if found:
        return {k: float(v) for k, v in found.items()}
    config = head_autoscaling_config()
    return autoscaling_config_max(config) if config else {}


def head_autoscaling_config() -> dict[str, Any] | None:
    """The autoscaling config of the cluster launcher or KubeRay head this process runs on."""
    path = Path(LAUNCHER_CONFIG).expanduser()
    if path.is_file():
        return yaml.safe_load(path.read_text())
    name, namespace = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("RAY_CLUSTER_NAMESPACE")
    if not (name and namespace and os.environ.get("KUBERNETES_SERVICE_HOST")):
        return None
    # deferred: Ray's private KubeRay modules, only on a KubeRay head; may move between Ray versions
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    try:
        # One request (the autoscaler's own producer retries for 20 s): a worker pod's service
        # account may not read RayClusters, only the head's (KubeRay's autoscaler role).
        cr = KubernetesHttpApiClient(namespace).get(f"rayclusters/{name}")
        return _derive_autoscaling_config_from_ray_cr(cr)
    except Exception as err:  # noqa: BLE001 - no config: checked as a fixed cluster
        warnings.warn(
            f"could not read RayCluster {namespace}/{name} for its autoscaling limits "
            f"({type(err).__name__}: {err}); checking the cluster as it is now",
            stacklevel=2,
        )
        return None


def autoscaling_config_max(config: dict[str, Any]) -> dict[str, float]:
    """The most of each resource an autoscaling config's nodes add up to.

    Every node type counts up to its `max_workers` (the head once), all worker types together
    up to the global `max_workers`, filled with the types richest in that resource first.

    Args:
        config: a cluster launcher YAML or KubeRay's derived autoscaling config
            (`available_node_types` with `resources`, `max_workers`; `head_node_type`).

    Returns:
        {resource: amount}; {} if no node type declares resources.
    """
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    left_total = math.inf if cap is None else float(cap)
    names = {r for t in types.values() for r in (t.get("resources") or {})}
    out: dict[str, float] = {}
    for res in sorted(names):
        amount, left = 0.0, left_total
        by_amount = sorted(
            types.items(), key=lambda kv: -(kv[1].get("resources") or {}).get(res, 0)
        )
        for name, node_type in by_amount:
            per_node = float((node_type.get("resources") or {}).get(res, 0))
            if name == head:
                amount += per_node
                continue
            count = min(float(node_type.get("max_workers", 0)), left)
            amount += count * per_node
            left -= count
        out[res] = amount
    return out
