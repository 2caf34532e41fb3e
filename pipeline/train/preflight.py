"""Checks before any worker starts: the config, data, weights and resources, without Ray.

Everything that can be wrong with a job is found here, so a worker never fails the same way
on every retry: `preflight` reads the shards' manifests, the weights files and a checkpoint a
job name resumes from, and checks that the workers fit this machine or the cluster (and what
its autoscaler can grow to). `check_cluster_storage` runs once connected to a cluster.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from panet_model import build_panet
from panet_model.weights import resolve_local
from pipeline import ray_session, storage, tracking
from pipeline.config import JobConfig
from pipeline.data.manifest import load_manifest
from pipeline.data.reader import inverse_label_map, num_rows, steps_per_epoch
from pipeline.train.checkpoints import check_resumable, latest_state_file
from pipeline.train.resume import check_job_change


@dataclass(frozen=True)
class Plan:
    """What the driver worked out before starting the workers."""

    num_classes: int  # categories + background
    categories: dict[int, str]  # dataset category id -> name
    inverse_labels: dict[int, int]  # contiguous label -> dataset category id
    steps_per_epoch: int
    train_rows: int
    val_rows: int
    manifest_id: str  # fingerprint of the training shards
    val_manifest_id: str = ""  # fingerprint of the validation shards
    # Config keys that differ from the checkpoint a resumed job goes on from: (key, old, new).
    changes: tuple[tuple[str, Any, Any], ...] = ()


def preflight(
    job: JobConfig,
    *,
    allow_changes: bool = False,
    autoscaler_max: dict[str, float] | None = None,
) -> Plan:
    """Check the config, weights, data and resources without Ray; ValueError names the problem.

    Args:
        job: the job.
        allow_changes: resume an existing job name even if its config changed (`--resume`);
            a job never resumes on other data.
        autoscaler_max: inside Ray, what the cluster's autoscaler can add up to, as the
            caller's driver found it (`preflight_resources`); None: asked here.
    """
    for key, path in (("data.train", job.data.train), ("data.val", job.data.val)):
        if not storage.exists(path):
            raise ValueError(f"config key {key!r}: shard directory {path!r} does not exist")
    tracking.resolve_tracking_uri(job.run_dir, job.tracking.uri or None)  # no SQLite on s3://
    train = _manifest(load_manifest, "data.train", job.data.train)
    val = _manifest(load_manifest, "data.val", job.data.val)
    train_cats = [(int(c["id"]), c["name"]) for c in train["categories"]]
    val_cats = [(int(c["id"]), c["name"]) for c in val["categories"]]
    if train_cats != val_cats:
        raise ValueError(
            f"data.train and data.val have different categories: {train_cats[:5]} vs {val_cats[:5]}"
        )
    try:
        spe = steps_per_epoch(train, job.solver.ims_per_batch)
    except ValueError as err:
        raise ValueError(f"config key 'solver.ims_per_batch': {err}") from err
    if num_rows(val) == 0:
        raise ValueError(f"config key 'data.val': {job.data.val!r} holds no records")
    preflight_resources(job, autoscaler_max)
    check_weights(job, len(train_cats) + 1)
    changes = check_job_change(
        job, dict(train_cats), str(train.get("fingerprint", "")), allow_changes=allow_changes
    )
    check_resume(job, len(train_cats) + 1)
    return Plan(
        num_classes=len(train_cats) + 1,
        categories=dict(train_cats),
        inverse_labels=inverse_label_map(train),
        steps_per_epoch=spe,
        train_rows=num_rows(train),
        val_rows=num_rows(val),
        manifest_id=str(train.get("fingerprint", "")),
        val_manifest_id=str(val.get("fingerprint", "")),
        changes=tuple(changes),
    )


def check_weights(job: JobConfig, num_classes: int) -> None:
    """The configured weights files exist and fit the model (a worker would fail on each retry)."""
    keys = (
        ("model.backbone.weights", job.model.backbone.weights),
        ("model.weights", job.model.weights),
    )
    for key, uri in keys:
        if uri:
            try:
                resolve_local(uri)
            except (ValueError, FileNotFoundError) as err:
                raise ValueError(f"config key {key!r}: {err}") from err
    if any(uri for _, uri in keys):
        try:
            build_panet(job.model, num_classes=num_classes)  # loads and shape-checks them
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(
                f"config key 'model.weights' / 'model.backbone.weights': {err}"
            ) from err


def check_resume(job: JobConfig, num_classes: int) -> None:
    """A job name that resumes must still fit its checkpoint (`check_resumable`)."""
    path = latest_state_file(job.run_dir)
    if path is None:
        return

    model = build_panet(job.model, num_classes=num_classes)
    check_resumable(path, model, job.to_dict()["model"])


def _manifest(load: Any, key: str, path: str) -> dict:
    try:
        return load(path)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"config key {key!r}: {err}") from err


def cluster_address(job: JobConfig) -> str:
    """The Ray cluster the job joins (`ray.address` or RAY_ADDRESS); "" for a local instance."""
    return job.ray.address or os.environ.get("RAY_ADDRESS", "")


def preflight_resources(job: JobConfig, autoscaler_max: dict[str, float] | None = None) -> None:
    """The resource check of `preflight`: against the cluster from inside Ray, else this machine.

    A process of a Ray cluster (a Tune trial's actor, a driver already connected) may run on any
    node, a CPU node too, while its job's workers go wherever the cluster places them: the check
    is against the cluster and what its autoscaler can add, never the process's own node (under
    `ray up` a trial's actor has no RAY_ADDRESS to tell it is on a cluster). A driver about to
    join a cluster is checked once connected (`run_training`); a local instance, against this
    machine.

    Args:
        job: the job.
        autoscaler_max: see `check_resources`. A trial passes its sweep driver's answer: the
            autoscaling config is read on the head node, and a trial may run on any node.
    """
    if ray_connected():
        check_resources(job, ray.cluster_resources(), autoscaler_max)
    elif not cluster_address(job):
        check_resources(job)


def ray_connected() -> bool:
    """Whether this process is a connected Ray driver or worker (Ray is not imported for it)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def check_resources(
    job: JobConfig,
    cluster: dict[str, float] | None = None,
    autoscaler_max: dict[str, float] | None = None,
) -> None:
    """Fail before any worker starts if the workers cannot be placed.

    An autoscaling cluster (KubeRay, the cluster launcher) may have no GPU node yet: it is
    checked against what its autoscaler can grow to, and only warned about what it lacks now.
    `ray.check_resources: false` (`panet train --skip-resource-check`) skips the check.

    Args:
        job: the job.
        cluster: the cluster's resources (`ray.cluster_resources()`): the workers plus one
            Ray Data decode task must fit its CPUs. None: a local instance not started yet,
            checked against this machine's cores and GPUs (the instance gets extra logical
            CPUs for the data tasks, `ray_session.connect`, or exactly `ray.num_cpus` if set).
        autoscaler_max: the most an autoscaling cluster can hold ({} for a fixed cluster);
            None: `ray_session.autoscaler_max_resources()`.
    """
    sc = job.scaling
    if not job.ray.check_resources:
        return
    # An elastic job starts with its minimum (`scaling.num_workers: [min, max]`).
    sc = dataclasses.replace(sc, num_workers=sc.min_workers or sc.num_workers)
    need = sc.num_workers * sc.cpus_per_worker
    if cluster is not None:
        cpus, gpus, where = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0), "the cluster has"
        data_cpus = job.data.decode_cpus
        growable = (
            ray_session.autoscaler_max_resources() if autoscaler_max is None else autoscaler_max
        )
        if growable:
            warn_if_short_now(job, cluster, growable)
            return
    elif job.ray.num_cpus:
        cpus, gpus, where = float(job.ray.num_cpus), _local_gpus(), "ray.num_cpus is"
        data_cpus = job.data.decode_cpus
    else:
        cpus, gpus, where = float(os.cpu_count() or 1), _local_gpus(), "this machine has"
        data_cpus = 0.0
    if need + data_cpus > cpus:
        for_data = f" plus {data_cpus:g} for Ray Data" if data_cpus else ""
        raise ValueError(
            f"config key 'scaling.num_workers': {sc.num_workers} workers x "
            f"{sc.cpus_per_worker:g} CPU (scaling.cpus_per_worker) need {need:g} CPUs"
            f"{for_data}, but {where} {cpus:g}"
        )
    if sc.use_gpu and sc.num_workers > gpus:
        raise ValueError(
            f"config key 'scaling.use_gpu': {sc.num_workers} workers need one GPU each, "
            f"but {where} {gpus:g}"
        )


def warn_if_short_now(
    job: JobConfig, cluster: dict[str, float], growable: dict[str, float]
) -> None:
    """Autoscaling cluster: fail if even its largest size is short, else warn what it lacks now."""
    sc = job.scaling
    sc = dataclasses.replace(sc, num_workers=sc.min_workers or sc.num_workers)
    need = {"CPU": sc.num_workers * sc.cpus_per_worker + job.data.decode_cpus}
    if sc.use_gpu:
        need["GPU"] = float(sc.num_workers)
    for name, amount in need.items():
        most = max(growable.get(name, 0.0), cluster.get(name, 0.0))
        key = "scaling.use_gpu" if name == "GPU" else "scaling.num_workers"
        if amount > most:
            raise ValueError(
                f"config key {key!r}: the job needs {amount:g} {name}, but this autoscaling "
                f"cluster grows to at most {most:g}"
            )
        if amount > cluster.get(name, 0.0):
            warnings.warn(
                f"the cluster has {cluster.get(name, 0.0):g} {name} now and the job needs "
                f"{amount:g}: the workers wait until its autoscaler adds nodes (up to {most:g})",
                stacklevel=2,
            )


def _local_gpus() -> float:
    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0


def check_cluster_storage(job: JobConfig) -> None:
    """On a cluster of several nodes, every node must see the data, checkpoints and tracking.

    A local path on one node is not on the others; a SQLite tracking store in such a folder
    would be written by whichever node rank 0 lands on. One small task per node checks (see
    `storage.check_on_every_node`); a single node has nothing to check.
    """
    if sum(1 for n in ray.nodes() if n.get("Alive")) < 2:
        return
    writable = {"checkpoint.storage_path": job.checkpoint.storage_path}
    uri = tracking.resolve_tracking_uri(job.run_dir, job.tracking.uri or None)
    db = uri[len("sqlite:///") :].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if db:
        # Named so the message says what to do: a server instead of a file on one node.
        writable["tracking.uri (the default SQLite store; or set a tracking server)"] = str(
            Path(db).parent
        )
    readable = {"data.train": job.data.train, "data.val": job.data.val}
    storage.check_on_every_node(readable, writable)
