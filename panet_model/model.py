"""The PANet module: torchvision's GeneralizedRCNN with input checks that name what is wrong."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from panet_model.config import TestConfig
from panet_model.tta import detect, uses_tricks

FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class PANet(GeneralizedRCNN):
    """Backbone (+FPN, +BPA) -> RPN -> RoI heads (+AFP, +FF, +HHD).

    Calling convention of torchvision's detection models: `model(images, targets)` returns a
    dict of losses in train mode, `model(images)` a list of
    `{"boxes", "labels", "scores", "masks"}` in eval mode, under the test-time tricks of
    `self.test` (`panet_model.tta`) when it asks for any.
    """

    test: TestConfig | None = None

    def forward(  # type: ignore[override]
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> Any:
        """
        Args:
            images: list of (3, H, W) float images in [0, 1], any sizes.
            targets: per image `boxes` (N, 4) float x1y1x2y2, `labels` (N,) int64 and, with a
                mask head, `masks` (N, H, W) uint8/bool; required in train mode.
        """
        num_classes = self.roi_heads.box_predictor.cls_score.out_features
        check_inputs(
            images, targets if self.training else None, self.roi_heads.has_mask(), num_classes
        )
        if not self.training and self.test is not None and uses_tricks(self.test):
            return detect(self, images, self.test)
        return super().forward(images, targets)


def check_inputs(
    images: list[Tensor],
    targets: list[dict[str, Tensor]] | None,
    needs_masks: bool,
    num_classes: int,
) -> None:
    """Raise a `ValueError`/`TypeError` naming the image, target and key that is malformed."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty list of (3, H, W) tensors, got {type(images)}"
        )
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise TypeError(f"image {i}: expected a Tensor, got {type(img).__name__}")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i}: expected shape (3, H, W), got {tuple(img.shape)}")
        if img.dtype not in FLOAT_TYPES:
            raise TypeError(
                f"image {i}: dtype {img.dtype}; expected a float image in [0, 1] "
                "(convert uint8 with img.float() / 255)"
            )
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"image {i}: empty image of shape {tuple(img.shape)}")
        if not bool(torch.isfinite(img).all()):
            raise ValueError(f"image {i}: contains NaN or inf values")
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    for i, (img, target) in enumerate(zip(images, targets)):
        _check_target(i, img, target, needs_masks, num_classes)


def _check_target(
    i: int, img: Tensor, target: dict[str, Tensor], needs_masks: bool, num_classes: int
) -> None:
    required = ("boxes", "labels", "masks") if needs_masks else ("boxes", "labels")
    for key in required:
        if key not in target:
            raise ValueError(f"target {i}: missing key {key!r} (has {sorted(target)})")
        if not isinstance(target[key], Tensor):
            raise TypeError(
                f"target {i}[{key!r}]: expected a Tensor, got {type(target[key]).__name__}"
            )
    boxes, labels = target["boxes"], target["labels"]
    if not boxes.is_floating_point():
        raise TypeError(f"target {i}['boxes']: dtype {boxes.dtype}; expected float")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"target {i}['boxes']: expected shape (N, 4), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if labels.dtype != torch.int64:
        raise TypeError(f"target {i}['labels']: dtype {labels.dtype}; expected torch.int64")
    if labels.shape != (n,):
        raise ValueError(f"target {i}['labels']: expected shape ({n},), got {tuple(labels.shape)}")
    if n and not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"target {i}['boxes']: contains NaN or inf values")
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bool(degenerate.any()):
        j = int(torch.nonzero(degenerate)[0])
        raise ValueError(
            f"target {i}['boxes'][{j}] = {boxes[j].tolist()} is degenerate: "
            "x2 > x1 and y2 > y1 are required"
        )
    if n and (int(labels.min()) < 1 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"target {i}['labels']: values {labels.tolist()} outside 1..{num_classes - 1} "
            "(0 is the background)"
        )
    if needs_masks:
        masks = target["masks"]
        expected = (n, img.shape[1], img.shape[2])
        if masks.dim() != 3 or tuple(masks.shape) != expected:
            raise ValueError(
                f"target {i}['masks']: shape {tuple(masks.shape)} does not match "
                f"{n} boxes on a {img.shape[1]}x{img.shape[2]} image (expected {expected})"
            )
