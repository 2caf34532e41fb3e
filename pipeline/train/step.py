"""One optimizer step over a rank's micro-batches: the fixed world (one) and the elastic one.

Every rank takes part in each collective of a step (the NaN vote, DDP's gradient all-reduce,
SyncBN) the same number of times, so a step whose loss is not finite on some rank is skipped on
every rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import JobConfig
from pipeline.data.collate import to_float_image
from pipeline.train.elastic import FULL_WORLD, MicroBatches

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]  # (images, targets) as the reader gives them


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did on this rank."""

    losses: dict[str, Tensor]  # loss terms averaged over the rank's micro-batches (detached)
    bad: str | None  # the first non-finite term when the step was skipped on every rank
    lr: float  # the learning rate the step used (the optimizer's is the next step's by now)
    images: int  # images this rank trained on


def train_step(
    model: nn.Module,
    batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    job: JobConfig,
    device: torch.device,
    share: MicroBatches = FULL_WORLD,
) -> StepResult:
    """One optimizer step over this rank's micro-batches, then the schedule's step.

    With the full world a rank has one micro-batch and one pass. With fewer workers than
    `scaling.num_workers` (`elastic.micro_batches`) it runs `share.passes` forward/backward
    passes, accumulating gradients, and DDP all-reduces them once, at the last pass (`no_sync`
    before it); a pass beyond the rank's batches repeats its last one with loss weight 0 so
    every rank's collectives stay aligned.

    Args:
        model: the (DDP-wrapped) model in train mode.
        batches: this rank's micro-batches of the step, on the host or the device already.
        optimizer, scheduler, scaler: from `loop.build_training`.
        job: the job (`solver.amp`, `solver.clip_grad_norm`).
        device: the rank's device.
        share: this rank's share of the step.

    Returns:
        The step's `StepResult`.
    """
    micro = [to_device(images, targets, device) for images, targets in batches]
    lr = float(optimizer.param_groups[0]["lr"])
    summed: dict[str, Tensor] = {}
    bad = None
    for i in range(share.passes):
        images, targets = micro[min(i, len(micro) - 1)]
        weight = share.weight if i < len(micro) else 0.0  # a repeat keeps collectives aligned
        last = i == share.passes - 1
        no_sync = getattr(model, "no_sync", None)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            loss_dict, total = forward_losses(model, images, targets, job, device)
            if any_rank(~torch.isfinite(total.detach())):
                clear_gradients(optimizer)
                summed, bad = loss_dict, first_bad_term(loss_dict)
                break
            # The full world's single pass is unweighted: the same arithmetic as a plain step.
            scaler.scale(total if weight == 1.0 else total * weight).backward()
        if weight > 0:
            for k, v in loss_dict.items():
                summed[k] = summed[k] + v.detach() if k in summed else v.detach()
    else:
        apply_gradients(model, optimizer, scaler, job)
        summed = {k: v / len(micro) for k, v in summed.items()}
    scheduler.step()
    return StepResult(summed, bad, lr, sum(len(images) for images, _ in micro))


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
