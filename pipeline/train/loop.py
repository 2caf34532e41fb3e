"""What every Ray Train worker runs: its setup, and the loop around `step.train_step`.

Rank 0 alone writes to MLflow and checkpoints; every rank takes part in every collective (DDP,
SyncBN, the NaN vote, the eval gather, `ray.train.report`) the same number of times.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from panet_model import build_panet
from pipeline import tracking
from pipeline.config import JobConfig
from pipeline.data.batches import (
    ReaderStats,
    in_background,
    iter_eval_batches,
    iter_train_batches,
)
from pipeline.evaluate.distributed import evaluate, gather_group
from pipeline.evaluate.scoring import coco_ground_truth, flat_metrics, format_metrics
from pipeline.failures import setup_or_none
from pipeline.quiet import quiet_worker
from pipeline.state_file import save_state
from pipeline.tracking.samples import log_prediction_pictures
from pipeline.train.checkpoints import (
    load_resume_state,
    location,
    restore_training_state,
    rng_state,
    upload_checkpoint,
)
from pipeline.train.elastic import group_steps, micro_batches, record_world
from pipeline.train.progress import Progress
from pipeline.train.solver import build_optimizer, build_scheduler
from pipeline.train.step import Batch, StepResult, train_step, world


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker trains with, the same from its start to its end (`driver.build_trainer`)."""

    job: JobConfig
    num_classes: int  # categories + background
    categories: dict[int, str]  # dataset category id -> name
    inverse_labels: dict[int, int]  # contiguous label -> dataset category id
    steps_per_epoch: int
    tracking_uri: str  # the job's MLflow store
    run_id: str  # the job's MLflow run
    results: Any  # the driver's `failures.ResultBox` actor: a setup error goes there
    gt: Any = None  # rank 0: the validation shards' COCO ground truth; None on other ranks


@dataclass(frozen=True)
class Training:
    """The model (DDP-wrapped on a worker) and what trains it, from `build_training`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


@dataclass
class LoopState:
    """What the loop carries from step to step."""

    step: int  # optimizer steps done
    metrics: dict[str, float]  # the last evaluation's (rank 0), saved with every checkpoint
    evaluated_at: int = -1  # the step of the last evaluation
    progress: Progress = field(init=False)  # the progress lines since this run started

    def __post_init__(self) -> None:
        self.progress = Progress(start_step=self.step)


def log_pictures(model: nn.Module, setup: WorkerSetup, step: int, device: torch.device) -> None:
    """Rank 0: predictions beside ground truth, and paper Figure 3 when AFP fuses with max."""
    try:
        log_prediction_pictures(
            model,
            setup.job,
            setup.categories,
            setup.inverse_labels,
            (setup.tracking_uri, setup.run_id),
            step,
            device,
        )
    except Exception as err:  # noqa: BLE001 - a picture must never kill a long job
        print(f"[train] warning: could not draw pictures at step {step}: {err}")


def save_checkpoint(training: Training, setup: WorkerSetup, state: LoopState) -> None:
    """Report a checkpoint (rank 0 writes it) with the metrics Ray keeps the best k by."""
    rank, size = world()
    step, metrics = state.step, state.metrics
    # Ray keeps the best k by segm_AP (and always the latest); -1 before the first evaluation.
    report = {"step": step, "segm_AP": -1.0, "bbox_AP": -1.0, **flat_metrics(metrics)}
    # 1.0 when the metrics come from an evaluation at this very step (Tune compares only those).
    report["fresh_eval"] = float(state.evaluated_at == step)
    report["train_loss"] = state.progress.train_loss
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            # Beside the state: the driver reads the final metrics without loading the model.
            # Written first: `save_state` seals the directory with every file in it.
            (Path(tmp) / "metrics.json").write_text(json.dumps({"step": step, **metrics}))
            save_state(
                Path(tmp),
                model=unwrap(training.model).state_dict(),
                optimizer=training.optimizer.state_dict(),
                scheduler=training.scheduler.state_dict(),
                scaler=training.scaler.state_dict(),
                step=step,
                epoch=step // setup.steps_per_epoch,
                rng=rng_state(),
                mlflow_run_id=setup.run_id,
                world_size=size,
                num_classes=setup.num_classes,
                categories=setup.categories,
                config=setup.job.to_dict(),
                metrics=dict(metrics),
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        # Our upload: retried while storage is unreachable, the seal last (`upload_files`).
        ray.train.report(
            report,
            checkpoint=checkpoint,
            checkpoint_dir_name=f"step-{step:08d}",
            checkpoint_upload_fn=upload_checkpoint,
        )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_training(
    job: JobConfig, num_classes: int, device: torch.device, state: dict[str, Any] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """Model on `device`, optimizer, schedule and scaler; restored from `state` if given.

    The model moves to its device before the optimizer is built and any state is loaded, so
    every optimizer state tensor lands on its parameter's device and dtype.

    Args:
        job: the job config.
        num_classes: categories + background.
        device: the worker's device.
        state: a checkpoint from `load_state`, or None for a fresh start.

    Returns:
        (model, optimizer, scheduler, scaler); the model is not DDP-wrapped yet.
    """
    model = build_panet(job.model, num_classes=num_classes).to(device)
    optimizer = build_optimizer(model, job)  # before DDP: groups see the plain module's names
    scheduler = build_scheduler(optimizer, job)
    scaler = torch.amp.GradScaler(
        device.type, enabled=job.solver.amp == "fp16" and device.type == "cuda"
    )
    if state is not None:
        restore_training_state(state, model, optimizer, scheduler, scaler)
    return model, optimizer, scheduler, scaler


def flush_denormals() -> None:
    """Flush subnormal floats to zero in this process's CPU arithmetic.

    A model without norm in its new layers (`panet-noMBN`) saturates its box classifier's
    softmax (logits spread by ~190 in a row, ~4 with MBN): ~9% of the logits' gradient is then
    subnormal (under 1.2e-38), values below fp32's normal range that carry nothing a step needs
    and that x86 CPUs compute on a slow path. GPUs are unaffected.
    """
    torch.set_flush_denormal(True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function. `config`: `WorkerSetup`'s fields but `gt`, from
    `driver.build_trainer`."""
    job: JobConfig = config["job"]
    quiet_worker()
    flush_denormals()
    rank, _ = world()
    device = ray.train.torch.get_device()
    check_amp_support(job.solver.amp, device)
    torch.manual_seed(job.seed)
    state = restored_state()
    step, metrics, saved_world = 0, {}, 0
    if state is not None:
        step, metrics = int(state["step"]), dict(state.get("metrics", {}))
        saved_world = int(state.get("world_size", 0))
    # A weights file that is missing or does not fit fails once, not on every retry.
    built = setup_or_none(
        functools.partial(build_training, job, config["num_classes"], device, state),
        config["results"],
        device,
    )
    if built is None:
        return
    model, optimizer, scheduler, scaler = built
    if state is not None and rank == 0:
        print(f"[train] resumed from the checkpoint at step {step}")
    del state
    ddp = ray.train.torch.prepare_model(
        model,
        parallel_strategy_kwargs={
            "find_unused_parameters": False,
            # Gradients live in DDP's buckets: no copy in and out of them at every step.
            "gradient_as_bucket_view": True,
        },
    )
    # NCCL: the gloo group every evaluation gathers over, made now so a bad network fails here.
    gather_group()
    uri, run_id = config["tracking_uri"], config["run_id"]
    # Rank 0's MLflow records go through its outbox on a server (`tracking.outbox`).
    if rank == 0:
        tracking.open_outbox(job.run_dir, uri, run_id, "rank0", outbox_settings(job))
    try:
        # The nodes, and a resize since the checkpoint.
        record_world(job, uri, run_id, step, saved_world)
        setup = WorkerSetup(**config, gt=coco_ground_truth(job.data.val) if rank == 0 else None)
        if step >= job.solver.max_steps:
            # A finished job re-run: nothing to train; hand back the final metrics.
            ray.train.report({"step": step, **flat_metrics(metrics)})
            return
        training = Training(ddp, optimizer, scheduler, scaler)
        train_loop(training, setup, LoopState(step, metrics), device)
    finally:
        # Delivered while the server answers; what it does not take, the driver delivers.
        tracking.close_outbox(uri, run_id, give_up_when_down=True)


def outbox_settings(job: JobConfig) -> tracking.OutboxSettings:
    """The job's `tracking.OutboxSettings` (the driver's are the same)."""
    return tracking.OutboxSettings(job.tracking.flush_timeout_s, job.tracking.retry_max_s)


def restored_state() -> dict[str, Any] | None:
    """The state of the checkpoint Ray Train restarts this worker group from, if any: its
    latest, or the newest whole one before it if that one no longer reads back."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    warn = print if world()[0] == 0 else (lambda _: None)
    return load_resume_state(location(checkpoint.filesystem, checkpoint.path), warn)


def check_amp_support(amp: str, device: torch.device, bf16_supported: Any = None) -> None:
    """Fail at start when `solver.amp` cannot run on `device`, not at the first step.

    bf16 needs native bfloat16 (compute capability 8.0+): `torch.cuda.is_bf16_supported()`
    alone also says yes on older GPUs, where bfloat16 tensors exist but run emulated.

    Args:
        amp: "off", "fp16" or "bf16".
        device: the worker's device (AMP only applies on CUDA).
        bf16_supported: the capability query, called without arguments; by default
            `torch.cuda.is_bf16_supported(including_emulation=False)`.

    Raises:
        ValueError: bf16 on a GPU without native bfloat16, naming the GPU.
    """
    if amp != "bf16" or device.type != "cuda":
        return
    if bf16_supported is None:
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        supported = bf16_supported()
    if not supported:
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
        raise ValueError(
            f"solver.amp=bf16: this GPU ({name}) has no native bfloat16 (needs compute "
            "capability 8.0+); use solver.amp=fp16 or solver.amp=off"
        )


def train_loop(
    training: Training, setup: WorkerSetup, state: LoopState, device: torch.device
) -> None:
    """Train from `state.step` to `solver.max_steps`; log, evaluate and checkpoint on schedule."""
    job = setup.job
    rank, size = world()
    train_shard = ray.train.get_dataset_shard("train")
    # Fewer workers than scaling.num_workers (elastic): this rank's share of the global batch.
    share = micro_batches(job.scaling.num_workers, size, rank)
    model, optimizer, scheduler, scaler = (
        training.model,
        training.optimizer,
        training.scheduler,
        training.scaler,
    )
    while state.step < job.solver.max_steps:
        model.train()
        waited_from = time.perf_counter()
        for group in epoch_steps(train_shard, setup, state, share.count, device):
            data_wait = time.perf_counter() - waited_from
            result = train_step(model, group, optimizer, scheduler, scaler, job, device, share)
            state.step += 1
            count_step(result, job, state, data_wait, size)
            on_schedule(training, setup, state, device)
            waited_from = time.perf_counter()
    if rank == 0 and job.tracking.log_model:
        log_final_model(model, setup, state.step)


def epoch_steps(
    train_shard: Any, setup: WorkerSetup, state: LoopState, count: int, device: torch.device
) -> Iterator[list[Batch]]:
    """The steps left in this epoch, each this rank's `count` micro-batches, read ahead.

    A resumed run finishes its epoch with a fresh pass over the data.
    """
    job, step, per_epoch = setup.job, state.step, setup.steps_per_epoch
    n = min(per_epoch - step % per_epoch, job.solver.max_steps - step)
    batches = iter_train_batches(
        train_shard,
        job.local_batch_size,
        n * count,
        state.progress.stats,
        group_window=job.data.group_window,
        seed=(job.seed, step // per_epoch, world()[0]),
        image_dtype=torch.uint8,
    )
    return group_steps(in_background(batches, pin_memory=device.type == "cuda"), count)


def count_step(
    result: StepResult, job: JobConfig, state: LoopState, data_wait: float, world_size: int
) -> None:
    """Add a step to the progress window, or count it as bad: too many stop the job."""
    progress = state.progress
    progress.window.lr = result.lr
    if result.bad is None:
        progress.window.add(result.losses, result.images * world_size, data_wait)
        return
    progress.bad_steps += 1
    if progress.bad_steps > job.solver.max_bad_steps:
        raise FloatingPointError(
            f"step {state.step}: loss is not finite ({result.bad}); stopped after "
            f"{progress.bad_steps} bad step(s) (solver.max_bad_steps={job.solver.max_bad_steps}). "
            "Lower solver.base_lr or set solver.clip_grad_norm."
        )
    if world()[0] == 0:
        print(f"[train] step {state.step}: skipped, loss not finite ({result.bad})")


def on_schedule(
    training: Training, setup: WorkerSetup, state: LoopState, device: torch.device
) -> None:
    """After a step: a progress line, an evaluation, a checkpoint, each at its interval.

    The last step does all three.
    """
    job, step = setup.job, state.step
    last = step == job.solver.max_steps
    if step % job.log_every == 0 or last:
        state.progress.log(job, (setup.tracking_uri, setup.run_id), step, device)
    if (job.eval.every_steps and step % job.eval.every_steps == 0) or last:
        state.metrics = evaluate_and_log(training.model, setup, step, device) or state.metrics
        state.evaluated_at = step
        training.model.train()
        release_host_memory()
    if step % job.checkpoint.every_steps == 0 or last:
        save_checkpoint(training, setup, state)


def log_final_model(model: nn.Module, setup: WorkerSetup, step: int) -> None:
    """Rank 0: the trained module to MLflow, with its `model_card`."""
    try:
        uri = tracking.log_model(
            setup.tracking_uri, setup.run_id, unwrap(model), step=step, metadata=model_card(setup)
        )
        print(f"[train] model logged to MLflow: {uri}")
    except Exception as err:  # noqa: BLE001 - the checkpoint holds the model anyway
        print(f"[train] warning: could not log the model to MLflow: {err}")


def model_card(setup: WorkerSetup) -> dict[str, Any]:
    """What `panet predict` needs beside the logged module: class names and the config.

    The module carries its own preprocessing (resize and normalisation in `model.transform`);
    it takes RGB float (3, H, W) images in [0, 1].
    """
    return {
        "panet": {
            "categories": [{"id": int(k), "name": str(v)} for k, v in setup.categories.items()],
            "num_classes": int(setup.num_classes),
            "model_config": setup.job.to_dict()["model"],
            "input": "RGB float32 (3, H, W) in [0, 1]",
        }
    }


def release_host_memory() -> None:
    """Hand the heap an evaluation freed back to the OS.

    An evaluation allocates blocks of other sizes than a train step (full-size images and
    masks, COCO results, pictures) while the batch thread keeps allocating in its own malloc
    arena; glibc keeps the freed pages, and without a trim a worker's resident memory rises at
    every evaluation (benchmarks/memory.py). A no-op where libc has no `malloc_trim`.
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def evaluate_and_log(
    model: nn.Module, setup: WorkerSetup, step: int, device: torch.device
) -> dict[str, float] | None:
    """Evaluate on the validation shards; rank 0 logs the 12 COCO metrics and the pictures.

    Returns:
        The metrics on rank 0, None elsewhere.
    """
    rank, _ = world()
    t0 = time.perf_counter()
    batches = iter_eval_batches(
        ray.train.get_dataset_shard("eval"), setup.job.eval.batch_size, ReaderStats()
    )
    metrics = evaluate(unwrap(model), batches, setup.gt, setup.inverse_labels, device)
    if rank != 0 or metrics is None:
        return None
    print(f"[eval] step {step} ({time.perf_counter() - t0:.0f} s)\n{format_metrics(metrics)}")
    tracking.log_metrics(setup.tracking_uri, setup.run_id, metrics, step)
    log_pictures(unwrap(model), setup, step, device)
    return metrics
