"""Elastic workers: the same global batch on however many workers Ray Train runs right now.

With `scaling.num_workers: [min, max]` Ray Train restarts the worker group from the last
checkpoint with fewer workers when a node is lost, and with more when capacity returns. The
recipe stays the job's: a step always averages the gradient of `solver.ims_per_batch` images in
`max` micro-batches of `ims_per_batch / max` images (the per-rank batch of the full world).
On `w` workers rank r trains on micro-batches r, r + w, ... (the missing ranks' share) and
accumulates their gradients, so the learning rate, schedule and step count are unchanged.
Every rank runs the same number of forward/backward passes, so SyncBN's and DDP's collectives
stay aligned; a rank with one micro-batch fewer repeats its last one with loss weight 0. This
module works out the shares; `step.train_step` runs a step over them.

Each (re)start records the world in the MLflow run: the worker nodes (tag `worker_nodes`),
metric `world_size` at the step it starts from, and a `resize.step-NNNNNNNN` tag
(`{"step", "old", "new"}`) when the size differs from the checkpoint's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
import torch.distributed as dist

from pipeline import tracking
from pipeline.config import JobConfig

T = TypeVar("T")


@dataclass(frozen=True)
class MicroBatches:
    """One rank's share of a step."""

    count: int  # micro-batches of data this rank trains on per step
    passes: int  # forward/backward passes per step, the same on every rank
    weight: float  # loss scale of a micro-batch: world_size / max_workers


# Every rank's share when all `scaling.num_workers` run: one micro-batch, one pass, unweighted.
FULL_WORLD = MicroBatches(count=1, passes=1, weight=1.0)


def micro_batches(max_workers: int, world_size: int, rank: int) -> MicroBatches:
    """Rank `rank`'s share of the `max_workers` micro-batches of a step on `world_size` ranks.

    DDP averages gradients over `world_size` ranks; scaling each micro-batch's loss by
    `world_size / max_workers` makes the step's gradient the mean over all `max_workers`
    micro-batches, as on the full world.
    """
    if not 1 <= world_size <= max_workers or not 0 <= rank < world_size:
        raise ValueError(
            f"need 1 <= world_size <= max_workers and 0 <= rank < world_size, got "
            f"world_size {world_size}, max_workers {max_workers}, rank {rank}"
        )
    count = len(range(rank, max_workers, world_size))
    return MicroBatches(
        count=count,
        passes=math.ceil(max_workers / world_size),
        weight=world_size / max_workers,
    )


def group_steps(batches: Iterable[T], count: int) -> Iterator[list[T]]:
    """Consecutive groups of `count` batches, one group per optimizer step."""
    group: list[T] = []
    for batch in batches:
        group.append(batch)
        if len(group) == count:
            yield group
            group = []
    if group:
        yield group


def record_world(
    job: JobConfig, tracking_uri: str, run_id: str, step: int, previous_size: int
) -> None:
    """Every rank: gather the worker nodes; rank 0 logs the world (and a resize) to MLflow.

    Args:
        job: the job config.
        tracking_uri, run_id: the job's MLflow store and run.
        step: the step training starts from.
        previous_size: the world size the checkpoint was written with (0: a fresh start).
    """
    node = ray.get_runtime_context().get_node_id()
    size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    nodes: list[Any] = [node]
    if size > 1:
        nodes = [None] * size
        dist.all_gather_object(nodes, node)
    if (dist.get_rank() if size > 1 else 0) != 0:
        return
    tags = {"worker_nodes": json.dumps(nodes)}
    if previous_size and previous_size != size:
        tags[f"resize.step-{step:08d}"] = json.dumps(
            {"step": step, "old": previous_size, "new": size}
        )
        share = micro_batches(job.scaling.num_workers, size, 0)
        print(
            f"[train] world size {previous_size} -> {size} at step {step}: {share.passes} "
            f"micro-batch(es) of {job.local_batch_size} images per rank keep the global batch "
            f"at {job.solver.ims_per_batch}",
            flush=True,
        )
    try:
        tracking.set_tags(tracking_uri, run_id, tags)
        tracking.log_metrics(tracking_uri, run_id, {"world_size": size}, step)
    except Exception as err:  # noqa: BLE001 - the record must not stop training
        print(f"[train] warning: could not record the world size in MLflow: {err}", flush=True)
