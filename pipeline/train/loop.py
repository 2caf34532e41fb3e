"""What every Ray Train worker runs: plain `train_step`, `evaluate_now` and the loop around them.

Rank 0 alone writes to MLflow and checkpoints; every rank takes part in every collective (DDP,
SyncBN, the NaN vote, the eval gather, `ray.train.report`) the same number of times.
"""

from __future__ import annotations

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
from pipeline.config import JobConfig
from pipeline.data.reader import ReaderStats, iter_eval_batches, iter_train_batches
from pipeline.tracking import runs as tracking
from pipeline.train.checkpoints import load_state, rng_state, save_state, set_rng_state
from pipeline.train.solver import build_optimizer, build_scheduler

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Window:
    """Throughput and loss accumulators between two progress lines."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    data_wait: float = 0.0
    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)

    def add(self, loss_dict: dict[str, Tensor], images: int, data_wait: float) -> None:
        self.steps += 1
        self.images += images
        self.data_wait += data_wait
        for k, v in loss_dict.items():
            self.losses[k] = self.losses.get(k, 0.0) + float(v.detach())


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


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
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
    amp = job.solver.amp if device.type == "cuda" else "off"
    with torch.autocast(
        device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp != "off"
    ):
        loss_dict = model(images, targets)
    total = sum(loss_dict.values())
    assert isinstance(total, Tensor)
    if any_rank(not bool(torch.isfinite(total.detach())), device):
        optimizer.zero_grad(set_to_none=True)
        return loss_dict, first_bad_term(loss_dict)
    scaler.scale(total).backward()
    if job.solver.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), job.solver.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_dict, None


def to_device(
    images: list[Tensor], targets: list[dict[str, Tensor]], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    non_blocking = device.type == "cuda"
    images = [i.to(device, non_blocking=non_blocking) for i in images]
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function. `config` comes from `trainer.build_trainer`."""
    job: JobConfig = config["job"]
    rank, size = world()
    device = ray.train.torch.get_device()
    torch.manual_seed(job.seed)
    model = build_panet(job.model, num_classes=config["num_classes"])
    optimizer = build_optimizer(model, job)  # before DDP: groups see the plain module's names
    scheduler = build_scheduler(optimizer, job)
    scaler = torch.amp.GradScaler(
        device.type, enabled=job.solver.amp == "fp16" and device.type == "cuda"
    )
    step, metrics = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, metrics = int(state["step"]), dict(state.get("metrics", {}))
        if rank == 0:
            print(f"[train] resumed from the checkpoint at step {step}")
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": False}
    )
    ctx = dict(config, job=job, gt=None)
    if rank == 0:
        from pipeline.evaluate import coco_ground_truth

        ctx["gt"] = coco_ground_truth(job.data.val)
    total_steps = job.solver.max_steps
    if step >= total_steps:
        # A finished job re-run: nothing to train; hand back the final metrics.
        ray.train.report({"step": step, **_flat_metrics(metrics)})
        return
    train_loop(model, optimizer, scheduler, scaler, ctx, step, metrics, device)


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
    while step < total_steps:
        # A resumed run finishes its epoch with a fresh pass over the data.
        n = min(steps_per_epoch - step % steps_per_epoch, total_steps - step)
        model.train()
        waited_from = time.perf_counter()
        batches = iter_train_batches(
            train_shard,
            job.local_batch_size,
            n,
            stats,
            group_window=job.data.group_window,
            seed=(job.seed, step // steps_per_epoch, rank),
        )
        for images, targets in batches:
            data_wait = time.perf_counter() - waited_from
            images, targets = to_device(images, targets, device)
            loss_dict, bad = train_step(model, images, targets, optimizer, scaler, job, device)
            scheduler.step()
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
                    optimizer,
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
            if step % job.checkpoint.every_steps == 0 or step == total_steps:
                save_checkpoint(model, optimizer, scheduler, scaler, ctx, step, metrics)
            waited_from = time.perf_counter()
    if rank == 0 and job.tracking.log_model:
        try:
            uri = tracking.log_model(ctx["tracking_uri"], run_id, unwrap(model), step=step)
            print(f"[train] model logged to MLflow: {uri}")
        except Exception as err:  # noqa: BLE001 - the checkpoint holds the model anyway
            print(f"[train] warning: could not log the model to MLflow: {err}")


def run_evaluation(
    model: nn.Module, ctx: dict[str, Any], step: int, device: torch.device
) -> dict[str, float] | None:
    """Evaluate, log the 12 COCO metrics and the pictures (rank 0); metrics on rank 0."""
    from pipeline.evaluate import format_metrics

    rank, _ = world()
    t0 = time.perf_counter()
    metrics = evaluate_now(unwrap(model), ctx, device)
    if rank != 0 or metrics is None:
        return None
    print(f"[eval] step {step} ({time.perf_counter() - t0:.0f} s)\n{format_metrics(metrics)}")
    tracking.log_metrics(ctx["tracking_uri"], ctx["run_id"], metrics, step)
    log_pictures(unwrap(model), ctx, step, device)
    return metrics


def log_progress(
    window: Window,
    optimizer: torch.optim.Optimizer,
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
    values = [window.losses[k] / steps for k in names] + [window.data_wait / elapsed]
    averaged = all_reduce_mean(values, device)
    losses = dict(zip(names, averaged[: len(names)]))
    data_wait_fraction = averaged[-1]
    if world()[0] != 0:
        return
    lr = optimizer.param_groups[0]["lr"]
    images_per_s = window.images / elapsed
    total = sum(losses.values())
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
    tracking.log_metrics(ctx["tracking_uri"], ctx["run_id"], metrics, step)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """`panet eval` on every worker: load a checkpoint, evaluate, report the metrics."""
    from panet_model import PANetConfig
    from panet_model.config import flatten
    from pipeline.evaluate import coco_ground_truth, evaluate

    rank, _ = world()
    device = ray.train.torch.get_device()
    state = load_state(config["checkpoint"])
    model_cfg = dict(state["config"]["model"])
    preset = model_cfg.pop("preset", "tiny")
    cfg = PANetConfig.preset(preset).override(flatten(model_cfg))
    model = build_panet(cfg, num_classes=int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.to(device)
    ctx = dict(config)
    ctx["gt"] = coco_ground_truth(config["data"]) if rank == 0 else None
    batches = iter_eval_batches(ray.train.get_dataset_shard("eval"), config["batch_size"])
    metrics = evaluate(model, batches, ctx["gt"], config["inverse_labels"], device)
    if metrics is not None:
        # Ray Train V2 hands the driver no metrics without a checkpoint: write them out.
        Path(config["metrics_path"]).write_text(json.dumps(metrics))
    ray.train.report(_flat_metrics(metrics or {}))
