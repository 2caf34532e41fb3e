"""Driver side of a training job: the MLflow run, `build_trainer` and `run_training`.

`build_trainer` is shared by `panet train` and the Tune job. Everything that can be wrong with
a config or the data is found by `preflight.preflight` before any worker starts.
"""

from __future__ import annotations

import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch
import torchvision
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import ray_session, storage, tracking
from pipeline.config import JobConfig, decode_options
from pipeline.data.reader import ReaderDataConfig, build_eval_dataset, build_train_dataset
from pipeline.failures import result_box, take_answer
from pipeline.train import capacity
from pipeline.train.checkpoints import latest_state_file, location
from pipeline.train.loop import outbox_settings, train_loop_per_worker
from pipeline.train.preflight import Plan, check_cluster_storage, check_resources, preflight
from pipeline.train.resume import describe, write_job_record

RUN_RECORD = "mlflow_run.json"  # in the job directory: the job's MLflow run id and tracking URI


def versions() -> dict[str, str]:
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
    shards as datasets. On a tracking server the driver's records go through the job's outbox
    (`tracking.open_outbox`), which `fit_run` closes.

    Args:
        job: the job.
        plan: from `preflight`.
        tags: more tags for the run (a Tune trial: `mlflow.parentRunId`, its overrides).
        entry_point: the run's "Source" in the MLflow UI.

    Returns:
        (tracking_uri, run_id)
    """
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
    tracking.open_outbox(job.run_dir, uri, run_id, "driver", outbox_settings(job))
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


def _scaling_config(job: JobConfig) -> Any:
    """Ray Train's workers for the job: a fixed count, or min..max when elastic."""
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
    return ScalingConfig(
        num_workers=workers,
        use_gpu=sc.use_gpu,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=sc.resize_interval_s,
    )


def build_trainer(
    job: JobConfig,
    plan: Plan,
    tracking_uri: str,
    run_id: str,
    results: Any,
    callbacks: list[Any] | None = None,
) -> Any:
    """A `TorchTrainer` for the job: DDP workers fed by the Ray Data reader.

    Args:
        job: the job (its name and `checkpoint.storage_path` place the Ray Train run).
        plan: from `preflight`.
        tracking_uri: the job's MLflow store.
        run_id: the job's MLflow run.
        results: a `failures.result_box()` for a worker's setup error (`fit_run` reads it).
        callbacks: Ray Train callbacks (a Tune trial passes its report callback).
    """
    aug = job.augment()
    decode = decode_options(job.to_dict())
    datasets = {
        "train": build_train_dataset(job.data.train, aug, seed=job.seed, **decode),
        "eval": build_eval_dataset(job.data.val, **decode),
    }
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
            "results": results,
        },
        scaling_config=_scaling_config(job),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage.absolute(job.checkpoint.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.checkpoint.keep_best,
                checkpoint_score_attribute="segm_AP",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(
                max_failures=job.ray.max_failures,
                controller_failure_limit=capacity.controller_failure_limit(job.ray.capacity_wait_s),
            ),
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
    print(
        f"[panet] job {job.name!r}: {plan.train_rows} training / {plan.val_rows} validation images, "
        f"{plan.num_classes - 1} classes, {job.scaling.num_workers} workers x "
        f"{job.local_batch_size} images, {job.solver.max_steps} steps "
        f"({plan.steps_per_epoch} per epoch), MLflow run {run_id}",
        flush=True,
    )
    results = result_box()
    trainer = build_trainer(job, plan, uri, run_id, results)
    with capacity.stop_said(job.name, job.ray.capacity_wait_s, trainer.scaling_config):
        result = fit_run(trainer, uri, run_id, results)
    checkpoint = (
        location(result.checkpoint.filesystem, result.checkpoint.path)
        if result.checkpoint
        else None
    )
    metrics: dict[str, float] = {}
    if checkpoint is not None:
        # The latest checkpoint always exists after a run and carries the last evaluation.
        saved = json.loads(storage.read_text(storage.join(checkpoint, "metrics.json")))
        metrics = coco_metrics(saved)
    return {"metrics": metrics, "tracking_uri": uri, "run_id": run_id, "checkpoint": checkpoint}


def fit_run(trainer: Any, tracking_uri: str, run_id: str, results: Any) -> Any:
    """Fit `trainer`, then end its MLflow run: FINISHED, KILLED when interrupted, else FAILED.

    Args:
        trainer: from `build_trainer`.
        tracking_uri, run_id: the job's MLflow run.
        results: the `failures.result_box()` given to `build_trainer`.

    The job's MLflow outbox is closed after that: its records are delivered, or, if the server
    is still down after `tracking.flush_timeout_s`, a message names what is left and where.

    Returns:
        Ray Train's `Result`.

    Raises:
        ValueError: a worker's setup error (a missing weights file, ...), raised once, not retried.
    """
    try:
        result = trainer.fit()
        take_answer(results)
    except BaseException:
        interrupted = _interrupted()
        tracking.finish_run(tracking_uri, run_id, "KILLED" if interrupted else "FAILED")
        # Interrupted: no waiting for a server that is down (what is left is reported).
        _close_outbox(tracking_uri, run_id, give_up_when_down=interrupted)
        raise
    tracking.finish_run(tracking_uri, run_id, "FINISHED")
    _close_outbox(tracking_uri, run_id)
    return result


def _close_outbox(tracking_uri: str, run_id: str, give_up_when_down: bool = False) -> None:
    """Deliver the job's remaining MLflow records (a bounded wait); say what is left, and where."""
    left = tracking.close_outbox(tracking_uri, run_id, give_up_when_down=give_up_when_down)
    if left:
        print(left, flush=True)


def coco_metrics(saved: dict[str, Any]) -> dict[str, float]:
    """The 12 COCO metrics of a checkpoint's `metrics.json` (its "step" left out)."""
    return {k: float(v) for k, v in saved.items() if k.startswith(("bbox/", "segm/"))}


def finished_result(job: JobConfig) -> dict[str, Any] | None:
    """The result of a job already trained to `solver.max_steps`, read without starting Ray.

    Re-running a finished job resumes it with nothing left to train: its latest checkpoint
    (`metrics.json` beside `state.pt`) and its MLflow run (`mlflow_run.json`) are the answer.
    None when the job is new, unfinished, or now logs to another tracking URI.
    """
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
    exc = sys.exc_info()[1]
    return isinstance(exc, KeyboardInterrupt)
