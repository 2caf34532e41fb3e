"""Driver side of a training job: checks, Ray, the MLflow run, and `build_trainer`.

`build_trainer` is shared by `panet train` and the Tune job. Everything that can be wrong with
a config or the data is found by `preflight` before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import ray_session, storage
from pipeline.config import JobConfig, decode_options
from pipeline.data.manifest import load_manifest
from pipeline.failures import FAILED_FILE, clear_failure, raise_failure
from pipeline.train.resume import check_job_change, describe, write_job_record

RUN_RECORD = "mlflow_run.json"  # in the job directory: the job's MLflow run id and tracking URI


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
    from pipeline import tracking
    from pipeline.data.reader import inverse_label_map, num_rows, steps_per_epoch

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
    from panet_model.weights import resolve_local

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
        from panet_model import build_panet

        try:
            build_panet(job.model, num_classes=num_classes)  # loads and shape-checks them
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(
                f"config key 'model.weights' / 'model.backbone.weights': {err}"
            ) from err


def check_resume(job: JobConfig, num_classes: int) -> None:
    """A job name that resumes must still fit its checkpoint (`check_resumable`)."""
    from pipeline.train.checkpoints import check_resumable, latest_state_file

    path = latest_state_file(job.run_dir)
    if path is None:
        return
    from panet_model import build_panet

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
        import ray

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
    import torch

    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0


def versions() -> dict[str, str]:
    import mlflow
    import ray
    import torch
    import torchvision

    return {
        "version.torch": torch.__version__,
        "version.torchvision": torchvision.__version__,
        "version.ray": ray.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
    }


def open_run(
    job: JobConfig,
    plan: Plan,
    tags: dict[str, Any] | None = None,
    entry_point: str = "panet train",
) -> tuple[str, str]:
    """The job's MLflow run: created once, then resumed by every re-run of the same job name.

    The run id lives in `<storage>/<name>/mlflow_run.json` (`tracking.open_run`, and in every
    checkpoint), so a resumed or restarted job logs into the same run and never creates a
    duplicate. The run records its source (entry point, git commit) and its train and val
    shards as datasets.

    Args:
        job: the job.
        plan: from `preflight`.
        tags: more tags for the run (a Tune trial: `mlflow.parentRunId`, its overrides).
        entry_point: the run's "Source" in the MLflow UI.

    Returns:
        (tracking_uri, run_id)
    """
    from pipeline import tracking

    job.run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(job.run_dir, job.tracking.uri or None)
    commit = tracking.git_commit()
    run_id = tracking.open_run(
        job.run_dir / RUN_RECORD,
        uri,
        job.tracking.experiment,
        job.name,
        {"job": job.name, **(tags or {})},
        entry_point,
        commit,
    )
    tracking.log_dataset_inputs(uri, run_id, dataset_inputs(job, plan))
    params: dict[str, Any] = dict(job.flat())
    params.update(versions())
    params.update(
        {
            "git_commit": commit,
            "world_size": job.scaling.num_workers,
            "data.manifest_id": plan.manifest_id,
            "data.train_rows": plan.train_rows,
            "data.val_rows": plan.val_rows,
            "num_classes": plan.num_classes,
            "lr_scaled": job.lr,
        }
    )
    tracking.log_params(uri, run_id, params)
    tracking.log_dict(uri, run_id, job.to_dict(), "config/resolved_config.json")
    return uri, run_id


def dataset_inputs(job: JobConfig, plan: Plan) -> list[dict[str, Any]]:
    """The job's train and val shards as MLflow dataset inputs (`tracking.log_dataset_inputs`)."""

    def uri(path: str) -> str:
        return path if "://" in path else Path(path).resolve().as_uri()

    return [
        {
            "name": Path(path).name or path,
            "source": uri(path),
            "digest": digest,
            "context": context,
            "rows": rows,
        }
        for path, digest, context, rows in (
            (job.data.train, plan.manifest_id, "training", plan.train_rows),
            (job.data.val, plan.val_manifest_id, "validation", plan.val_rows),
        )
    ]


def build_trainer(
    job: JobConfig,
    plan: Plan,
    tracking_uri: str,
    run_id: str,
    callbacks: list[Any] | None = None,
) -> Any:
    """A `TorchTrainer` for the job: DDP workers fed by the Ray Data reader.

    Args:
        job: the job (its name and `checkpoint.storage_path` place the Ray Train run).
        plan: from `preflight`.
        tracking_uri: the job's MLflow store.
        run_id: the job's MLflow run.
        callbacks: Ray Train callbacks (a Tune trial passes its report callback).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.reader import ReaderDataConfig, build_eval_dataset, build_train_dataset
    from pipeline.train.loop import train_loop_per_worker

    aug = job.augment()
    decode = decode_options(job.to_dict())
    datasets = {
        "train": build_train_dataset(job.data.train, aug, seed=job.seed, **decode),
        "eval": build_eval_dataset(job.data.val, **decode),
    }
    sc = job.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = 1
    if sc.worker_resource:
        resources[sc.worker_resource] = 1
    # Elastic: Ray Train runs min..max workers as nodes come and go; the loop keeps the global
    # batch by gradient accumulation (`elastic.micro_batches`).
    workers = (
        (sc.min_workers, sc.num_workers) if 0 < sc.min_workers < sc.num_workers else sc.num_workers
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job,
            "num_classes": plan.num_classes,
            "categories": plan.categories,
            "inverse_labels": plan.inverse_labels,
            "steps_per_epoch": plan.steps_per_epoch,
            "tracking_uri": tracking_uri,
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=sc.resize_interval_s,
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage.absolute(job.checkpoint.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.checkpoint.keep_best,
                checkpoint_score_attribute="segm_AP",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=job.ray.max_failures),
            worker_runtime_env=ray_session.worker_env(),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ReaderDataConfig(
            eval_datasets=("eval",), preserve_order=job.data.preserve_order
        ),
    )


def run_training(job: JobConfig, *, allow_changes: bool = False) -> dict[str, Any]:
    """`panet train`: check, connect, open the MLflow run, train, and return the final metrics.

    Args:
        job: the job.
        allow_changes: resume an existing job name with a changed config (`--resume`).

    Returns:
        {"metrics": the 12 COCO metrics of the last evaluation, "tracking_uri", "run_id",
        "checkpoint": path of the latest checkpoint}.
    """
    import ray

    from pipeline import tracking

    plan = preflight(job, allow_changes=allow_changes)
    if plan.changes:
        print(
            f"[panet] job {job.name!r} resumes with changes: {describe(plan.changes)}", flush=True
        )
    done = finished_result(job)
    if done is not None:
        return done
    ray_session.connect(
        job.ray.address,
        num_cpus=job.ray.num_cpus,
        # Logical CPUs for the Ray Data decode tasks beside the workers' (`ray_session.connect`).
        min_cpus=job.scaling.num_workers * job.scaling.cpus_per_worker + 2,
    )
    check_resources(job, ray.cluster_resources())
    check_cluster_storage(job)
    with warnings.catch_warnings():
        # A resumed job's changed params go to `param_changed.*` tags; the line above names them.
        warnings.filterwarnings("ignore", "params already logged with other values")
        uri, run_id = open_run(job, plan)
    write_job_record(job.run_dir, plan.manifest_id, plan.val_manifest_id)
    clear_failure(job.run_dir / FAILED_FILE)
    print(
        f"[panet] job {job.name!r}: {plan.train_rows} training / {plan.val_rows} validation images, "
        f"{plan.num_classes - 1} classes, {job.scaling.num_workers} workers x "
        f"{job.local_batch_size} images, {job.solver.max_steps} steps "
        f"({plan.steps_per_epoch} per epoch), MLflow run {run_id}",
        flush=True,
    )
    trainer = build_trainer(job, plan, uri, run_id)
    try:
        result = trainer.fit()
    except BaseException:
        tracking.finish_run(uri, run_id, "FAILED" if not _interrupted() else "KILLED")
        raise
    try:
        raise_failure(job.run_dir / FAILED_FILE)  # a worker's setup error, not retried
    except ValueError:
        tracking.finish_run(uri, run_id, "FAILED")
        raise
    tracking.finish_run(uri, run_id, "FINISHED")
    checkpoint = checkpoint_location(result.checkpoint) if result.checkpoint else None
    metrics: dict[str, float] = {}
    if checkpoint is not None:
        # The latest checkpoint always exists after a run and carries the last evaluation.
        saved = json.loads(storage.read_text(storage.join(checkpoint, "metrics.json")))
        metrics = coco_metrics(saved)
    return {"metrics": metrics, "tracking_uri": uri, "run_id": run_id, "checkpoint": checkpoint}


def checkpoint_location(checkpoint: Any) -> str:
    """A Ray Train checkpoint's location as the pipeline writes it: a path or an s3:// URI."""
    kind = checkpoint.filesystem.type_name
    if kind == "local":
        return str(checkpoint.path)
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{checkpoint.path}"


def check_cluster_storage(job: JobConfig) -> None:
    """On a cluster of several nodes, every node must see the data, checkpoints and tracking.

    A local path on one node is not on the others; a SQLite tracking store in such a folder
    would be written by whichever node rank 0 lands on. One small task per node checks (see
    `storage.check_on_every_node`); a single node has nothing to check.
    """
    import ray

    from pipeline import tracking

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


def coco_metrics(saved: dict[str, Any]) -> dict[str, float]:
    """The 12 COCO metrics of a checkpoint's `metrics.json` (its "step" left out)."""
    return {k: float(v) for k, v in saved.items() if k.startswith(("bbox/", "segm/"))}


def finished_result(job: JobConfig) -> dict[str, Any] | None:
    """The result of a job already trained to `solver.max_steps`, read without starting Ray.

    Re-running a finished job resumes it with nothing left to train: its latest checkpoint
    (`metrics.json` beside `state.pt`) and its MLflow run (`mlflow_run.json`) are the answer.
    None when the job is new, unfinished, or now logs to another tracking URI.
    """
    from pipeline import tracking
    from pipeline.train.checkpoints import latest_state_file

    path = latest_state_file(job.run_dir)
    if path is None:
        return None
    try:
        saved = json.loads((path.parent / "metrics.json").read_text())
        record = json.loads((job.run_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: the Ray path resumes from state.pt, rewrites both
    uri = tracking.resolve_tracking_uri(job.run_dir, job.tracking.uri or None)
    step = int(saved.get("step", -1))
    if step < job.solver.max_steps or record.get("tracking_uri") != uri:
        return None
    print(
        f"[panet] job {job.name!r} is already trained to step {step} (solver.max_steps="
        f"{job.solver.max_steps}): nothing to train; raise it (--set solver.max_steps=N) to train "
        f"on, or train a new job (--new-name). Latest checkpoint: {path.parent}",
        flush=True,
    )
    return {
        "metrics": coco_metrics(saved),
        "tracking_uri": uri,
        "run_id": record["run_id"],
        "checkpoint": str(path.parent),
    }


def _interrupted() -> bool:
    import sys

    exc = sys.exc_info()[1]
    return isinstance(exc, KeyboardInterrupt)
