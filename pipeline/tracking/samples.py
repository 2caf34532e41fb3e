"""Pictures logged at each evaluation: predictions beside ground truth, and paper Figure 3."""

from __future__ import annotations

import io
import tempfile
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from panet_model.diagnostics import level_share
from pipeline import tracking
from pipeline.data.manifest import iter_records
from pipeline.tracking.pictures import level_share_figure, prediction_figure


def read_samples(shard_dir: str, count: int, label_of: dict[int, int]) -> list[dict[str, Any]]:
    """The first `count` records of a shard directory, decoded for drawing.

    Returns:
        Dicts with "image" (H, W, 3) uint8 and "gt" {"boxes" (N, 4) x1y1x2y2, "labels" (N,)
        contiguous, "masks" (N, H, W) bool} of the non-crowd instances.
    """
    samples = []
    for record in islice(iter_records(shard_dir), count):
        image = np.array(Image.open(io.BytesIO(record["image"])).convert("RGB"))
        h, w = image.shape[:2]
        anns = [a for a in record["annotations"] if not a["iscrowd"]]
        masks = (
            mask_utils.decode([{"size": [h, w], "counts": a["rle"]} for a in anns]).astype(bool)
            if anns
            else np.zeros((h, w, 0), dtype=bool)
        )
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # COCO xywh -> x1y1x2y2
        samples.append(
            {
                "image": image,
                "gt": {
                    "boxes": boxes,
                    "labels": np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64),
                    "masks": masks.transpose(2, 0, 1),  # (H, W, N) -> (N, H, W)
                },
            }
        )
    return samples


@torch.inference_mode()
def predict(model: nn.Module, images: list[np.ndarray], device: torch.device) -> list[dict]:
    """Eval-mode predictions as numpy: boxes, labels, scores, masks (N, H, W) bool."""
    model.eval()
    tensors = [torch.from_numpy(i).permute(2, 0, 1).float().div(255).to(device) for i in images]
    out = []
    for o in model(tensors):
        out.append(
            {
                "boxes": o["boxes"].cpu().numpy(),
                "labels": o["labels"].cpu().numpy(),
                "scores": o["scores"].cpu().numpy(),
                "masks": (o["masks"][:, 0] > 0.5).cpu().numpy(),  # (N, 1, H, W) -> (N, H, W)
            }
        )
    return out


def log_prediction_pictures(
    model: nn.Module,
    job: Any,
    categories: dict[int, str],
    inverse_labels: dict[int, int],
    run: tuple[str, str],
    step: int,
    device: torch.device,
) -> None:
    """Draw and log the prediction picture and, under AFP max fusion, the level-share chart.

    Args:
        model: the detector (not DDP-wrapped).
        job: the job config (`eval.pictures`, `data.val`).
        categories: dataset category id -> name.
        inverse_labels: contiguous label -> dataset category id.
        run: (tracking URI, run id) of the MLflow run the pictures go to.
        step: the training step, in the file names.
        device: where the model is.
    """
    if job.eval.pictures <= 0:
        return
    uri, run_id = run
    label_of = {cat: label for label, cat in inverse_labels.items()}
    samples = read_samples(job.data.val, job.eval.pictures, label_of)
    if not samples:
        return
    images = [s["image"] for s in samples]
    names = {label: categories[cat] for label, cat in inverse_labels.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = prediction_figure(
            images,
            predict(model, images, device),
            [s["gt"] for s in samples],
            names,
            path=Path(tmp) / f"predictions_step{step:08d}.png",
        )
        tracking.log_artifact_file(uri, run_id, path, "predictions")
        tensors = [torch.from_numpy(i).permute(2, 0, 1).float().div(255).to(device) for i in images]
        shares = level_share(model, tensors)
        if shares:
            chart = level_share_figure(
                {k: v.numpy() for k, v in shares.items()},
                Path(tmp) / f"level_share_step{step:08d}.png",
            )
            tracking.log_artifact_file(uri, run_id, chart, "level_share")
            tracking.log_dict(
                uri,
                run_id,
                {k: v.tolist() for k, v in shares.items()},
                f"level_share/level_share_step{step:08d}.json",
            )
