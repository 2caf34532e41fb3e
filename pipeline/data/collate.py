"""Turn decoded sample rows into torchvision's detection inputs, on the train worker.

This is the last possible step for the masks: they cross the object store as compressed RLE
and are only decoded to dense tensors here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.augment import decode_rle_wh


def image_tensor(
    data: bytes, height: int, width: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Raw RGB bytes to an image tensor.

    Args:
        data: (H, W, 3) uint8 RGB, C order, as bytes.
        height, width: H, W.
        dtype: torch.float32 for the model's input, or torch.uint8 to keep the bytes (a
            quarter of the size to copy to a GPU; `to_float_image` converts there).

    Returns:
        (3, H, W): float32 in [0, 1], or uint8 in [0, 255].
    """
    # bytearray: torch refuses to wrap read-only memory without a warning; this is one copy.
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    hwc = flat.view(height, width, 3)  # (H * W * 3,) -> (H, W, 3)
    chw = hwc.permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    # A plain `.float()` would keep the permuted (channels-last) strides; the model wants planes.
    if dtype == torch.uint8:
        return chw.contiguous()
    return chw.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def to_float_image(image: Tensor) -> Tensor:
    """(3, H, W) uint8 in [0, 255] -> float32 in [0, 1] on the image's device; float as is."""
    if image.dtype != torch.uint8:
        return image
    return image.to(torch.float32).div_(255.0)


def decode_masks(rles: Sequence[str], height: int, width: int) -> Tensor:
    """Compressed RLE masks to a dense tensor.

    Args:
        rles: N compressed counts strings at (H, W).
        height, width: H, W.

    Returns:
        (N, H, W) uint8 in {0, 1}.
    """
    masks = np.empty((len(rles), height, width), np.uint8)
    for i, counts in enumerate(rles):
        masks[i] = decode_rle_wh(counts, height, width).T  # (W, H) -> (H, W)
    return torch.from_numpy(masks)


def train_target(row: Mapping[str, Any]) -> dict[str, Tensor]:
    """The torchvision Mask R-CNN target of one valid `TRAIN_SAMPLE_SCHEMA` row.

    Returns:
        {"boxes": (N, 4) float32 x1y1x2y2, "labels": (N,) int64, "masks": (N, H, W) uint8,
        "image_id": () int64}.
    """
    h, w = int(row["height"]), int(row["width"])
    boxes = torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4)  # (N * 4,) -> (N, 4)
    return {
        "boxes": boxes,
        "labels": torch.tensor(row["labels"], dtype=torch.int64).reshape(-1),
        "masks": decode_masks(row["rles"], h, w),
        "image_id": torch.tensor(int(row["image_id"]), dtype=torch.int64),
    }


def collate_train(
    rows: Sequence[Mapping[str, Any]], image_dtype: torch.dtype = torch.float32
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Collate valid training rows into torchvision's `model(images, targets)` inputs.

    Args:
        rows: B valid rows of `augment.TRAIN_SAMPLE_SCHEMA` as dicts (sizes may differ).
        image_dtype: as for `image_tensor`.

    Returns:
        (images, targets): B (3, H_i, W_i) images (float32 in [0, 1], or uint8), and B target
        dicts as in `train_target`.
    """
    images = [
        image_tensor(r["image"], int(r["height"]), int(r["width"]), image_dtype) for r in rows
    ]
    return images, [train_target(r) for r in rows]


def collate_eval(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Collate valid evaluation rows.

    Args:
        rows: B valid rows of `augment.EVAL_SAMPLE_SCHEMA` as dicts.

    Returns:
        (images, targets): B float32 (3, H_i, W_i) images at their original size, and B dicts
        {"image_id": () int64, "orig_size": (2,) int64 [H, W]}.
    """
    images = [image_tensor(r["image"], int(r["height"]), int(r["width"])) for r in rows]
    targets = [
        {
            "image_id": torch.tensor(int(r["image_id"]), dtype=torch.int64),
            "orig_size": torch.tensor([int(r["height"]), int(r["width"])], dtype=torch.int64),
        }
        for r in rows
    ]
    return images, targets
