"""COCO scoring (box and mask AP): ground truth from shards, model outputs as COCO results,
COCOeval.

    coco_ground_truth(shard_dir)            -> pycocotools COCO of the shards' annotations
    predictions_to_coco(outputs, ids, map)  -> COCO result dicts
    score(gt, results)                      -> {"bbox/AP": ..., "segm/APl": ...} (12 metrics)
    format_metrics(metrics)                 -> a readable table

Metrics are fractions in [0, 1]. COCOeval reports -1 for a size range (or a whole data set)
without any ground truth; here such a metric is NaN instead (as in detectron2), so that it can
never be mistaken for, or averaged with, a real AP. `format_metrics` prints it as "-".
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from pipeline.data.manifest import load_manifest, shard_paths

IOU_TYPES = ("bbox", "segm")
# The first six COCOeval `stats`, in order: AP@[.5:.95], AP@.5, AP@.75, AP small/medium/large.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Only what the ground truth needs: reading the `image` column would pull every JPEG from disk.
_GT_COLUMNS = ["image_id", "file_name", "height", "width", "annotations"]


# ---------------------------------------------------------------------------------------------
# Ground truth and results


def coco_ground_truth(shard_dir: str | Path) -> COCO:
    """An in-memory COCO ground truth of every record in a shard directory.

    Streams the shards one row batch at a time, reading only ids, sizes and annotations (never
    the image bytes); the returned object holds every annotation's compressed RLE. Crowd
    annotations are kept with `iscrowd=1`, so COCOeval ignores detections matched to them.

    Args:
        shard_dir: directory written by `panet data convert` (manifest.json + Parquet shards).

    Returns:
        A `COCO` with `images` ({id, file_name, height, width}), `annotations` ({id (1..),
        image_id, category_id, bbox [x, y, w, h], area, iscrowd, segmentation {"size": [h, w],
        "counts": str}}) and the manifest's `categories` ({id, name}).

    Raises:
        ValueError: the manifest or a shard's schema is bad (from `manifest.load_manifest`), or
            an image_id appears twice (its results could not be told apart).
    """
    manifest = load_manifest(shard_dir)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    seen: set[int] = set()
    for path in shard_paths(manifest, shard_dir):
        for batch in pq.ParquetFile(path).iter_batches(columns=_GT_COLUMNS, batch_size=256):
            for row in batch.to_pylist():
                image_id, h, w = int(row["image_id"]), int(row["height"]), int(row["width"])
                if image_id in seen:
                    raise ValueError(f"{shard_dir}: image_id {image_id} appears in two records")
                seen.add(image_id)
                images.append(
                    {"id": image_id, "file_name": row["file_name"], "height": h, "width": w}
                )
                for ann in row["annotations"] or []:
                    annotations.append(
                        {
                            # COCOeval marks "unmatched" with id 0, so ids must start at 1.
                            "id": len(annotations) + 1,
                            "image_id": image_id,
                            "category_id": int(ann["category_id"]),
                            "bbox": [float(v) for v in ann["bbox"]],
                            "area": float(ann["area"]),
                            "iscrowd": int(ann["iscrowd"]),
                            "segmentation": {"size": [h, w], "counts": ann["rle"]},
                        }
                    )
    categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in manifest["categories"]]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        gt.createIndex()
    return gt


def predictions_to_coco(
    outputs: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int | Tensor],
    inverse_label_map: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Model outputs -> COCO result dicts, one per detection, usable for bbox and segm at once.

    Args:
        outputs: one dict per image, as the model returns in eval mode: "boxes" (N, 4) x1y1x2y2
            in original image pixels, "labels" (N,) contiguous 1..C, "scores" (N,) and
            optionally "masks" (N, 1, H, W) or (N, H, W) at the original image size, either
            float probabilities or already binary (bool / uint8).
        image_ids: the dataset image id of each output (int or 0-d tensor).
        inverse_label_map: contiguous label -> dataset category id (`reader.inverse_label_map`).
        mask_threshold: a float mask pixel is foreground where its probability is > this.

    Returns:
        [{"image_id", "category_id" (dataset id), "bbox" [x, y, w, h], "score",
        "segmentation" {"size": [H, W], "counts": str (compressed RLE)}}, ...]; no
        "segmentation" key if the outputs have no masks.

    Raises:
        ValueError: outputs and image_ids differ in length, or a label is not in the map.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, raw_id in zip(outputs, image_ids):
        image_id = int(raw_id)
        boxes = output["boxes"].detach().cpu().to(torch.float64).reshape(-1, 4)
        n = boxes.shape[0]
        if n == 0:
            continue
        # (N, 4) x1y1x2y2 -> (N, 4) xywh
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().cpu().reshape(-1).tolist()
        try:
            categories = [
                inverse_label_map[label] for label in output["labels"].reshape(-1).tolist()
            ]
        except KeyError as e:
            raise ValueError(
                f"image {image_id}: label {e.args[0]} is not in inverse_label_map "
                f"(labels {sorted(inverse_label_map)})"
            ) from None
        rles: list[dict[str, Any]] | None = None
        if "masks" in output:
            rles = _encode_masks(output["masks"], n, mask_threshold)
        for i in range(n):
            result = {
                "image_id": image_id,
                "category_id": categories[i],
                "bbox": xywh[i],
                "score": scores[i],
            }
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


def _encode_masks(masks: Tensor, n: int, threshold: float) -> list[dict[str, Any]]:
    """N masks of one image -> N compressed RLEs with str counts, in one pycocotools call."""
    masks = masks.detach().cpu()
    if masks.dim() == 4:
        masks = masks[:, 0]  # (N, 1, H, W) -> (N, H, W)
    if masks.dim() != 3 or masks.shape[0] != n:
        raise ValueError(f"masks of shape {tuple(masks.shape)} for {n} boxes")
    binary = masks > threshold if masks.is_floating_point() else masks != 0  # (N, H, W) bool
    # encode wants (H, W, N) uint8 in Fortran order, which is the memory of a C-order (N, W, H)
    # array: one copy (the transpose), then free views.
    nwh = binary.transpose(1, 2).contiguous().numpy().view(np.uint8)  # (N, H, W) -> (N, W, H)
    hwn = np.asfortranarray(nwh.transpose(2, 1, 0))  # (N, W, H) -> (H, W, N), no copy
    rles = mask_utils.encode(hwn)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # str: JSON- and MLflow-friendly
    return rles


# ---------------------------------------------------------------------------------------------
# COCOeval


def score(
    gt: COCO,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    *,
    verbose: bool = False,
) -> dict[str, float]:
    """Run COCOeval over every ground-truth image for each IoU type.

    Images without any result count (as misses), and so does a whole empty result list: every
    metric with ground truth is then 0.0. `results` is not modified.

    Args:
        gt: ground truth, e.g. from `coco_ground_truth`.
        results: COCO result dicts, e.g. from `predictions_to_coco` (the merged list of all
            ranks). For "segm" each needs a "segmentation" at its image's size.
        iou_types: any of "bbox", "segm".
        verbose: let pycocotools print its progress and summary tables to stdout.

    Returns:
        {"bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl", and the same
        for "segm/"} (for the requested types) as fractions in [0, 1]; NaN where there is no
        ground truth to measure (COCOeval's -1), e.g. "segm/APl" without large objects.

    Raises:
        ValueError: unknown IoU type, a result for an image not in `gt`, or (segm) a result
            without a mask or with a mask of another size than its image.
    """
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"unknown iou_types {unknown}, expected some of {IOU_TYPES}")
    _check_results(gt, results, need_masks="segm" in iou_types)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            # Without "bbox", loadRes takes the detection's area from its mask (the area ranges
            # of segm AP are mask areas) instead of from its box.
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            dets = [dict(r) for r in results]  # loadRes writes into the dicts it gets
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_eval = COCOeval(gt, _load_results(gt, dets), iou_type)
            coco_eval.params.imgIds = sorted(gt.getImgIds())
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        for name, value in zip(METRIC_NAMES, coco_eval.stats[: len(METRIC_NAMES)]):
            metrics[f"{iou_type}/{name}"] = float(value) if value >= 0 else math.nan
    return metrics


def _check_results(gt: COCO, results: Sequence[Mapping[str, Any]], need_masks: bool) -> None:
    """Fail with a clear message where pycocotools would assert or compute garbage."""
    for r in results:
        image = gt.imgs.get(r["image_id"])
        if image is None:
            raise ValueError(
                f"result for image_id {r['image_id']}, which is not in the ground truth "
                "(evaluated on another data set?)"
            )
        if not need_masks:
            continue
        seg = r.get("segmentation")
        if not isinstance(seg, Mapping):
            raise ValueError(f"image {r['image_id']}: segm evaluation needs a mask in every result")
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise ValueError(
                f"image {r['image_id']}: mask of size {list(seg['size'])}, the image is "
                f"{[image['height'], image['width']]} (masks must be at the original size)"
            )


def _load_results(gt: COCO, dets: list[dict[str, Any]]) -> COCO:
    """`gt.loadRes(dets)`, which cannot take an empty list: then a result set with no detection."""
    if dets:
        return gt.loadRes(dets)
    res = COCO()
    res.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def format_metrics(metrics: Mapping[str, float]) -> str:
    """The metrics of `score` as a table: a row per IoU type, a column per metric.

    Args:
        metrics: {"bbox/AP": ..., ...}; types or metrics missing from it are left out or "-".

    Returns:
        e.g.::

                  AP   AP50   AP75    APs    APm    APl
            bbox  0.372  0.581  0.401  0.211  0.405  0.482
            segm  0.337  0.550  0.357  0.159  0.364  0.501

        with fractions to 3 decimals (like pycocotools' summary) and "-" for NaN.
    """
    rows = [t for t in IOU_TYPES if any(f"{t}/{m}" in metrics for m in METRIC_NAMES)]
    lines = ["      " + " ".join(f"{m:>6}" for m in METRIC_NAMES)]
    for iou_type in rows:
        cells = []
        for m in METRIC_NAMES:
            value = metrics.get(f"{iou_type}/{m}", math.nan)
            cells.append(f"{'-':>6}" if math.isnan(value) else f"{value:6.3f}")
        lines.append(f"{iou_type:<5} " + " ".join(cells))
    return "\n".join(lines)


def flat_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics under the names Ray Train reports and keeps checkpoints by ("segm_AP")."""
    return {k.replace("/", "_"): v for k, v in metrics.items()}
