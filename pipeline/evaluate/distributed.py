"""Distributed evaluation: every rank infers on its share, rank 0 gathers and scores.

    infer(model, batches, ...)      -> this rank's COCO results (`scoring.predictions_to_coco`)
    gather(results)                 -> every rank's results on rank 0, None elsewhere
    evaluate(model, batches, gt, ...) -> infer, gather, and `scoring.score` on rank 0

The reader gives every eval image to exactly one rank, and ranks get different numbers of
batches (possibly none), so `infer` runs no collective at all: it unwraps a
`DistributedDataParallel` model, whose first forward after a training step broadcasts buffers.
`gather` is the one synchronisation point, called once by every rank at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from torch import Tensor, nn

from pipeline.evaluate.scoring import IOU_TYPES, predictions_to_coco, score


def infer(
    model: nn.Module,
    batches: Iterable[tuple[Sequence[Tensor], Sequence[Mapping[str, Any]]]],
    inverse_label_map: Mapping[int, int],
    device: torch.device | str,
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Run inference over this rank's eval batches and convert the outputs to COCO results.

    The model is put in eval mode for the pass and given back in the mode it was in. A
    `DistributedDataParallel` wrapper is bypassed: its first forward after a training step
    broadcasts buffers, a collective that a rank without eval batches would never join.

    Args:
        model: a detection model (`build_panet`), possibly DDP-wrapped.
        batches: (images, targets) pairs, e.g. `batches.iter_eval_batches`: float (3, H, W)
            images at their original size and targets with at least "image_id" (int or 0-d
            tensor).
        inverse_label_map: contiguous label -> dataset category id.
        device: where to run the model.
        mask_threshold: mask probability above which a pixel is foreground.

    Returns:
        This rank's COCO result dicts, as `predictions_to_coco`.
    """
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = net.training
    net.eval()
    results: list[dict[str, Any]] = []
    try:
        with torch.inference_mode():
            for images, targets in batches:
                outputs = net([image.to(device) for image in images])
                cpu_outputs = []
                for output in outputs:
                    output = dict(output)
                    if "masks" in output:
                        # Threshold where the masks are: a quarter of the bytes cross to the CPU.
                        output["masks"] = output["masks"] > mask_threshold
                    cpu_outputs.append({k: v.to("cpu") for k, v in output.items()})
                image_ids = [int(t["image_id"]) for t in targets]
                results += predictions_to_coco(cpu_outputs, image_ids, inverse_label_map)
    finally:
        net.train(was_training)
    return results


# The default group this process's gather group was made for, and that gloo group.
_gather_group: tuple[Any, dist.ProcessGroup] | None = None


def gather_group() -> dist.ProcessGroup | None:
    """The group `gather` sends Python objects over; made once per process.

    None (the default group) when it is gloo or there is no distributed run. Otherwise (NCCL)
    a gloo group of every rank, created on the first call and kept: call it when the worker
    starts, so that a network problem between the hosts shows then, not at the first
    evaluation hours later. Every rank must call it the first time (it is a collective).

    Returns:
        The gloo group, or None for the default group.
    """
    global _gather_group
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _gather_group is None or _gather_group[0] is not world:
        group = dist.new_group(backend="gloo")  # every rank is a member: a real group
        assert isinstance(group, dist.ProcessGroup)
        _gather_group = (world, group)
    return _gather_group[1]


def gather(results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Merge every rank's COCO results on rank 0.

    Must be called by every rank of the default process group. The image ids of each rank
    are exchanged first and checked for overlap on every rank (so all ranks fail together,
    instead of rank 0 failing while the others wait); then the results go to rank 0 only. With
    NCCL, the objects travel through the gloo group of `gather_group`, so the (large) pickled
    results never occupy GPU memory.

    Args:
        results: this rank's results (`infer`).

    Returns:
        Rank 0: all ranks' results, in rank order. Other ranks: None. Without an initialized
        process group of more than one rank: `results` itself.

    Raises:
        ValueError: an image_id has results from two ranks (the eval split gave it twice).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    world, rank = dist.get_world_size(), dist.get_rank()
    group = gather_group()
    ids_per_rank: list[Any] = [None] * world
    dist.all_gather_object(ids_per_rank, sorted({r["image_id"] for r in results}), group=group)
    _check_disjoint(ids_per_rank)
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(results, gathered, dst=0, group=group)
    if gathered is None:
        return None
    return [r for part in gathered for r in part]


def _check_disjoint(ids_per_rank: Sequence[Sequence[int]]) -> None:
    owner: dict[int, int] = {}
    for rank, ids in enumerate(ids_per_rank):
        for image_id in ids:
            other = owner.setdefault(image_id, rank)
            if other != rank:
                raise ValueError(
                    f"image_id {image_id} was evaluated on ranks {other} and {rank}; every eval "
                    "image must reach exactly one rank (split eval data with equal=False, "
                    "reader.ReaderDataConfig)"
                )


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Sequence[Tensor], Sequence[Mapping[str, Any]]]],
    gt: COCO | None,
    inverse_label_map: Mapping[int, int],
    device: torch.device | str,
    *,
    iou_types: Sequence[str] = IOU_TYPES,
    verbose: bool = False,
) -> dict[str, float] | None:
    """Distributed COCO evaluation: inference on every rank, COCOeval on rank 0.

    Every rank must call it (it gathers once at the end). COCOeval runs on rank 0 only, so the
    other ranks return at once and wait in their next collective.

    Args:
        model: the detection model, possibly DDP-wrapped.
        batches: this rank's eval batches, as for `infer`.
        gt: ground truth (`coco_ground_truth`); only rank 0 reads it, others may pass None.
        inverse_label_map: contiguous label -> dataset category id.
        device: where to run the model.
        iou_types: as for `score`.
        verbose: let pycocotools print to stdout.

    Returns:
        Rank 0 (or a single process): the metrics of `score`. Other ranks: None.

    Raises:
        ValueError: rank 0 got no ground truth, or as `gather` / `score`.
    """
    results = gather(infer(model, batches, inverse_label_map, device))
    if results is None:
        return None
    if gt is None:
        raise ValueError("evaluate: rank 0 needs the ground truth (gt=None)")
    return score(gt, results, iou_types, verbose=verbose)
