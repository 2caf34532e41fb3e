"""What every Ray Train worker runs: plain `train_step`, `evaluate_now` and the loop around them.

Rank 0 alone writes to MLflow and checkpoints; every rank takes part in every collective (DDP,
SyncBN, the NaN vote, the eval gather, `ray.train.report`) the same number of times.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from panet_model import build_panet
from pipeline import tracking
from pipeline.config import JobConfig
from pipeline.data.collate import to_float_image
from pipeline.data.reader import (
    ReaderStats,
    in_background,
    iter_eval_batches,
    iter_train_batches,
)
from pipeline.train.checkpoints import (
    load_state,
    restore_training_state,
    rng_state,
    save_state,
)
from pipeline.train.elastic import elastic_step, group_steps, micro_batches, record_world
from pipeline.train.failures import FAILED_FILE, NON_RETRYABLE, setup_or_none
from pipeline.train.quiet import quiet_worker
from pipeline.train.solver import build_optimizer, build_scheduler

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Window:
    """Throughput and loss accumulators between two progress lines.

    Loss terms are summed on their device and read once per progress line: a `float()` per
    term and step would wait for the device every step.
    """

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    data_wait: float = 0.0
    steps: int = 0
    losses: dict[str, Tensor] = field(default_factory=dict)
    lr: float = math.nan  # the learning rate of the window's last step

    def add(self, loss_dict: dict[str, Tensor], images: int, data_wait: float) -> None:
        self.steps += 1
        self.images += images
        self.data_wait += data_wait
        for k, v in loss_dict.items():
            v = v.detach().to(torch.float64)
            self.losses[k] = self.losses[k] + v if k in self.losses else v


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of a few floats, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _, size = world()
    if size > 1:
        dist.all_reduce(t)
        t /= size
    return t.tolist()


def any_rank(flag: Tensor) -> bool:
    """True on every rank if the boolean tensor `flag` (on the rank's device) is True on any rank.

    The one host sync of a step: every rank must know before the backward pass whether all
    ranks take it (DDP's gradient all-reduce). The detection model syncs many times per
    forward pass anyway (proposal filtering, sampling, empty-target checks).
    """
    t = flag.detach().reshape(1).to(torch.float32)
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def first_bad_term(loss_dict: dict[str, Tensor]) -> str:
    for k, v in loss_dict.items():
        if not torch.isfinite(v.detach()).all():
            return f"{k}={float(v.detach())}"
    return "a loss on another rank"


def train_step(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    job: JobConfig,
    device: torch.device,
) -> tuple[dict[str, Tensor], str | None]:
    """One optimizer step. Returns the loss terms, and the bad term if any rank saw NaN/inf.

    A step whose loss is not finite on some rank is skipped on every rank (no backward), so
    DDP's gradient all-reduce stays in step.
    """
    loss_dict, total = forward_losses(model, images, targets, job, device)
    if any_rank(~torch.isfinite(total.detach())):
        clear_gradients(optimizer)
        return loss_dict, first_bad_term(loss_dict)
    scaler.scale(total).backward()
    apply_gradients(model, optimizer, scaler, job)
    return loss_dict, None


def forward_losses(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    job: JobConfig,
    device: torch.device,
) -> tuple[dict[str, Tensor], Tensor]:
    """The model's loss terms and their sum, under the job's AMP on a GPU."""
    amp = job.solver.amp if device.type == "cuda" else "off"
    with torch.autocast(
        device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp != "off"
    ):
        loss_dict = model(images, targets)
    total = sum(loss_dict.values())
    assert isinstance(total, Tensor)
    return loss_dict, total


def apply_gradients(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, job: JobConfig
) -> None:
    """Clip (if configured), step the optimizer through the scaler, clear the gradients."""
    if job.solver.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), job.solver.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    clear_gradients(optimizer)


def clear_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Zero the gradients in place.

    DDP runs with `gradient_as_bucket_view=True`: each gradient is a view into DDP's
    all-reduce bucket, so autograd accumulates straight into it. Setting gradients to None
    would make the next backward allocate fresh ones and DDP copy them into the buckets
    (torch's DDP docstring): the copy and memory that option exists to save.
    """
    optimizer.zero_grad(set_to_none=False)


def step_and_schedule(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    job: JobConfig,
    device: torch.device,
) -> tuple[dict[str, Tensor], str | None, float]:
    """`train_step`, then the schedule's step.

    Returns:
        (loss terms, the bad term or None, the learning rate this step used): the optimizer's
        rate once the scheduler has stepped is the next step's.
    """
    lr = float(optimizer.param_groups[0]["lr"])
    loss_dict, bad = train_step(model, images, targets, optimizer, scaler, job, device)
    scheduler.step()
    return loss_dict, bad, lr


def to_device(
    images: list[Tensor], targets: list[dict[str, Tensor]], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A batch onto `device`; uint8 images become float32 in [0, 1] there.

    Copies are asynchronous on CUDA (the reader pins the batch in `in_background`).
    """
    non_blocking = device.type == "cuda"
    images = [to_float_image(i.to(device, non_blocking=non_blocking)) for i in images]
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets


def evaluate_now(
    model: nn.Module, ctx: dict[str, Any], device: torch.device
) -> dict[str, float] | None:
    """Distributed COCO evaluation of the validation shards; metrics on rank 0, None elsewhere."""
    from pipeline.evaluate import evaluate

    stats = ReaderStats()
    batches = iter_eval_batches(
        ray.train.get_dataset_shard("eval"), ctx["job"].eval.batch_size, stats
    )
    return evaluate(model, batches, ctx.get("gt"), ctx["inverse_labels"], device)


def log_pictures(model: nn.Module, ctx: dict[str, Any], step: int, device: torch.device) -> None:
    """Rank 0: predictions beside ground truth, and paper Figure 3 when AFP fuses with max."""
    from pipeline.tracking.samples import log_prediction_pictures

    try:
        log_prediction_pictures(model, ctx, step, device)
    except Exception as err:  # noqa: BLE001 - a picture must never kill a long job
        print(f"[train] warning: could not draw pictures at step {step}: {err}")


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    ctx: dict[str, Any],
    step: int,
    metrics: dict[str, float],
) -> None:
    """Report a checkpoint (rank 0 writes it) with the metrics Ray keeps the best k by."""
    rank, _ = world()
    job: JobConfig = ctx["job"]
    # Ray keeps the best k by segm_AP (and always the latest); -1 before the first evaluation.
    report = {"step": step, "segm_AP": -1.0, "bbox_AP": -1.0, **_flat_metrics(metrics)}
    # 1.0 when the metrics come from an evaluation at this very step (Tune compares only those).
    report["fresh_eval"] = float(ctx.get("evaluated_at") == step)
    report["train_loss"] = ctx.get("train_loss", math.nan)  # of the last progress line
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_state(
                Path(tmp),
                model=unwrap(model).state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                step=step,
                epoch=step // ctx["steps_per_epoch"],
                rng=rng_state(),
                mlflow_run_id=ctx["run_id"],
                world_size=world()[1],
                num_classes=ctx["num_classes"],
                categories=ctx["categories"],
                config=job.to_dict(),
                metrics=dict(metrics),
            )
            # Beside the state: the driver reads the final metrics without loading the model.
            (Path(tmp) / "metrics.json").write_text(json.dumps({"step": step, **metrics}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")


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
    """The Ray Train worker function. `config` comes from `trainer.build_trainer`."""
    job: JobConfig = config["job"]
    quiet_worker()
    flush_denormals()
    rank, size = world()
    device = ray.train.torch.get_device()
    check_amp_support(job.solver.amp, device)
    torch.manual_seed(job.seed)
    state, step, metrics, saved_world = None, 0, {}, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        step, metrics = int(state["step"]), dict(state.get("metrics", {}))
        saved_world = int(state.get("world_size", 0))
    # A weights file that is missing or does not fit fails once, not on every retry.
    built = setup_or_none(
        functools.partial(build_training, job, config["num_classes"], device, state),
        job.run_dir / FAILED_FILE,
        device,
    )
    if built is None:
        return
    model, optimizer, scheduler, scaler = built
    if state is not None and rank == 0:
        print(f"[train] resumed from the checkpoint at step {step}")
    del state
    model = ray.train.torch.prepare_model(
        model,
        parallel_strategy_kwargs={
            "find_unused_parameters": False,
            # Gradients live in DDP's buckets: no copy in and out of them at every step.
            "gradient_as_bucket_view": True,
        },
    )
    from pipeline.evaluate import coco_ground_truth, gather_group

    # NCCL: the gloo group every evaluation gathers over, made now so a bad network fails here.
    gather_group()
    ctx = dict(config, job=job, gt=None)
    record_world(ctx, step, saved_world)  # the nodes, and a resize since the checkpoint
    if rank == 0:
        ctx["gt"] = coco_ground_truth(job.data.val)
    total_steps = job.solver.max_steps
    if step >= total_steps:
        # A finished job re-run: nothing to train; hand back the final metrics.
        ray.train.report({"step": step, **_flat_metrics(metrics)})
        return
    train_loop(model, optimizer, scheduler, scaler, ctx, step, metrics, device)


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


def _flat_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace("/", "_"): v for k, v in metrics.items()}


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    ctx: dict[str, Any],
    step: int,
    metrics: dict[str, float],
    device: torch.device,
) -> None:
    job: JobConfig = ctx["job"]
    rank, size = world()
    run_id = ctx["run_id"]
    total_steps = job.solver.max_steps
    steps_per_epoch = ctx["steps_per_epoch"]
    stats = ReaderStats()
    bad_steps = 0
    window = Window()
    run_start, run_start_step = time.perf_counter(), step
    train_shard = ray.train.get_dataset_shard("train")
    # Fewer workers than scaling.num_workers (elastic): this rank's share of the global batch.
    share = micro_batches(job.scaling.num_workers, size, rank)
    while step < total_steps:
        # A resumed run finishes its epoch with a fresh pass over the data.
        n = min(steps_per_epoch - step % steps_per_epoch, total_steps - step)
        model.train()
        waited_from = time.perf_counter()
        batches = iter_train_batches(
            train_shard,
            job.local_batch_size,
            n * share.count,
            stats,
            group_window=job.data.group_window,
            seed=(job.seed, step // steps_per_epoch, rank),
            image_dtype=torch.uint8,
        )
        prepared = in_background(batches, pin_memory=device.type == "cuda")
        for group in group_steps(prepared, share.count):
            data_wait = time.perf_counter() - waited_from
            if share.accumulating:
                loss_dict, bad, window.lr, images = elastic_step(
                    model, group, share, optimizer, scheduler, scaler, job, device
                )
            else:
                images, targets = to_device(*group[0], device)
                loss_dict, bad, window.lr = step_and_schedule(
                    model, images, targets, optimizer, scheduler, scaler, job, device
                )
            step += 1
            if bad is not None:
                bad_steps += 1
                if bad_steps > job.solver.max_bad_steps:
                    raise FloatingPointError(
                        f"step {step}: loss is not finite ({bad}); stopped after {bad_steps} bad "
                        f"step(s) (solver.max_bad_steps={job.solver.max_bad_steps}). Lower "
                        "solver.base_lr or set solver.clip_grad_norm."
                    )
                if rank == 0:
                    print(f"[train] step {step}: skipped, loss not finite ({bad})")
            else:
                window.add(loss_dict, len(images) * size, data_wait)
            if step % job.log_every == 0 or step == total_steps:
                log_progress(
                    window,
                    ctx,
                    step,
                    stats,
                    bad_steps,
                    device,
                    run_start,
                    run_start_step,
                )
                window = Window()
            is_eval = job.eval.every_steps and step % job.eval.every_steps == 0
            if is_eval or step == total_steps:
                metrics = run_evaluation(model, ctx, step, device) or metrics
                model.train()
                release_host_memory()
            if step % job.checkpoint.every_steps == 0 or step == total_steps:
                save_checkpoint(model, optimizer, scheduler, scaler, ctx, step, metrics)
            waited_from = time.perf_counter()
    if rank == 0 and job.tracking.log_model:
        try:
            uri = tracking.log_model(
                ctx["tracking_uri"], run_id, unwrap(model), step=step, metadata=model_card(ctx)
            )
            print(f"[train] model logged to MLflow: {uri}")
        except Exception as err:  # noqa: BLE001 - the checkpoint holds the model anyway
            print(f"[train] warning: could not log the model to MLflow: {err}")


def model_card(ctx: dict[str, Any]) -> dict[str, Any]:
    """What `panet predict` needs beside the logged module: class names and the config.

    The module carries its own preprocessing (resize and normalisation in `model.transform`);
    it takes RGB float (3, H, W) images in [0, 1].
    """
    return {
        "panet": {
            "categories": [{"id": int(k), "name": str(v)} for k, v in ctx["categories"].items()],
            "num_classes": int(ctx["num_classes"]),
            "model_config": ctx["job"].to_dict()["model"],
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
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def run_evaluation(
    model: nn.Module, ctx: dict[str, Any], step: int, device: torch.device
) -> dict[str, float] | None:
    """Evaluate, log the 12 COCO metrics and the pictures (rank 0); metrics on rank 0."""
    from pipeline.evaluate import format_metrics

    rank, _ = world()
    t0 = time.perf_counter()
    metrics = evaluate_now(unwrap(model), ctx, device)
    ctx["evaluated_at"] = step
    if rank != 0 or metrics is None:
        return None
    print(f"[eval] step {step} ({time.perf_counter() - t0:.0f} s)\n{format_metrics(metrics)}")
    tracking.log_metrics(ctx["tracking_uri"], ctx["run_id"], metrics, step)
    log_pictures(unwrap(model), ctx, step, device)
    return metrics


def log_progress(
    window: Window,
    ctx: dict[str, Any],
    step: int,
    stats: ReaderStats,
    bad_steps: int,
    device: torch.device,
    run_start: float,
    run_start_step: int,
) -> None:
    """Average the window over ranks; rank 0 prints a progress line and logs to MLflow."""
    job: JobConfig = ctx["job"]
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    names = sorted(window.losses)
    steps = max(window.steps, 1)
    values = [float(window.losses[k]) / steps for k in names] + [window.data_wait / elapsed]
    averaged = all_reduce_mean(values, device)
    losses = dict(zip(names, averaged[: len(names)]))
    data_wait_fraction = averaged[-1]
    if world()[0] != 0:
        return
    lr = window.lr
    images_per_s = window.images / elapsed
    total = sum(losses.values())
    ctx["train_loss"] = total
    rate = (step - run_start_step) / max(time.perf_counter() - run_start, 1e-9)
    eta = (job.solver.max_steps - step) / rate if rate > 0 else math.inf
    terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items())
    print(
        f"[train] step {step}/{job.solver.max_steps} | loss {total:.3f} ({terms}) | lr {lr:.5f} "
        f"| {images_per_s:.1f} img/s | data wait {100 * data_wait_fraction:.0f}% "
        f"| ETA {_duration(eta)}",
        flush=True,
    )
    metrics = {f"train/{k}": v for k, v in losses.items()}
    metrics.update(
        {
            "train/loss": total,
            "train/lr": lr,
            "train/images_per_s": images_per_s,
            "train/data_wait_fraction": data_wait_fraction,
            "train/bad_steps": bad_steps,
        }
    )
    metrics.update({f"data/{k}": v for k, v in stats.as_dict().items()})
    metrics.update({f"host/{k}": v for k, v in host_memory().items()})
    tracking.log_metrics(ctx["tracking_uri"], ctx["run_id"], metrics, step)


def host_memory() -> dict[str, float]:
    """This process's resident memory in GB from /proc/self/status; {} where there is none.

    `rss_anon_gb` is the process's own heap; `rss_shmem_gb` counts pages of shared memory it
    touched (Ray's object store), which the kernel reports as resident in every reader.
    """
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    fields = {"RssAnon": "rss_anon_gb", "RssFile": "rss_file_gb", "RssShmem": "rss_shmem_gb"}
    memory = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            memory[fields[key]] = int(value.split()[0]) / 2**20  # kB -> GB
    return memory


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """`panet eval` on every worker: load a checkpoint, evaluate, report the metrics."""
    from pipeline.evaluate import coco_ground_truth, evaluate
    from pipeline.train.checkpoints import model_config

    quiet_worker()
    rank, _ = world()
    device = ray.train.torch.get_device()

    results = config["results"]  # a `driver.ResultBox` actor: rank 0 may be on another node

    def load_model() -> nn.Module:
        try:
            state = load_state(config["checkpoint"])
            cfg = model_config(state, config.get("model_overrides"))
            model = build_panet(cfg, num_classes=int(state["num_classes"]))
            model.load_state_dict(state["model"])
            return model
        except NON_RETRYABLE as err:
            ray.get(results.put.remote("error", str(err)))
            raise

    with tempfile.TemporaryDirectory() as tmp:  # the error travels through `results`
        model = setup_or_none(load_model, Path(tmp) / FAILED_FILE, device)
    if model is None:
        return
    model.to(device)
    ctx = dict(config)
    ctx["gt"] = coco_ground_truth(config["data"]) if rank == 0 else None
    batches = iter_eval_batches(ray.train.get_dataset_shard("eval"), config["batch_size"])
    metrics = evaluate(model, batches, ctx["gt"], config["inverse_labels"], device)
    if metrics is not None:
        # Ray Train V2 hands the driver no metrics without a checkpoint: the actor does.
        ray.get(results.put.remote("metrics", metrics))
    ray.train.report(_flat_metrics(metrics or {}))
