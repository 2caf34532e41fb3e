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
    """Raise a `ValueError`/`TypeError` naming the image, target and key that is malformed.

    Types and shapes are checked on the host. The values (finite pixels and boxes, boxes with
    x2 > x1 and y2 > y1, labels in range) are reduced on the tensors' device to one flag per
    check and read back once for the whole batch: one host-device sync instead of a few per
    image, which on a GPU each wait for all queued work. Only a bad batch is read again, to
    name the culprit.
    """
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty list of (3, H, W) tensors, got {type(images)}"
        )
    for i, img in enumerate(images):
        _check_image(i, img)
    if targets is not None:
        if len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        for i, (img, target) in enumerate(zip(images, targets)):
            _check_target(i, img, target, needs_masks)
    # One 0-d bool per value check, named (what, index) for the message of a bad one.
    names: list[tuple[str, int]] = []
    flags: list[Tensor] = []
    for i, img in enumerate(images):
        names.append(("image", i))
        flags.append(~torch.isfinite(img).all())
    for i, target in enumerate(targets or ()):
        boxes, labels = target["boxes"], target["labels"]
        names += [("boxes", i), ("degenerate", i), ("labels", i)]
        flags += [
            ~torch.isfinite(boxes).all(),
            ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any(),
            ((labels < 1) | (labels >= num_classes)).any(),
        ]
    device = images[0].device
    bad = torch.stack([f.to(device) for f in flags]).tolist()  # the one host-device sync
    if any(bad):
        what, i = names[bad.index(True)]
        raise ValueError(_bad_value(what, i, images, targets, num_classes))


def _check_image(i: int, img: Tensor) -> None:
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


def _check_target(i: int, img: Tensor, target: dict[str, Tensor], needs_masks: bool) -> None:
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
    if needs_masks:
        masks = target["masks"]
        expected = (n, img.shape[1], img.shape[2])
        if masks.dim() != 3 or tuple(masks.shape) != expected:
            raise ValueError(
                f"target {i}['masks']: shape {tuple(masks.shape)} does not match "
                f"{n} boxes on a {img.shape[1]}x{img.shape[2]} image (expected {expected})"
            )


def _bad_value(
    what: str,
    i: int,
    images: list[Tensor],
    targets: list[dict[str, Tensor]] | None,
    num_classes: int,
) -> str:
    """The message for the value check `what` that failed on image/target `i`."""
    if what == "image":
        return f"image {i}: contains NaN or inf values"
    assert targets is not None
    boxes, labels = targets[i]["boxes"], targets[i]["labels"]
    if what == "boxes":
        return f"target {i}['boxes']: contains NaN or inf values"
    if what == "degenerate":
        j = int(torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0])
        return (
            f"target {i}['boxes'][{j}] = {boxes[j].tolist()} is degenerate: "
            "x2 > x1 and y2 > y1 are required"
        )
    return (
        f"target {i}['labels']: values {labels.tolist()} outside 1..{num_classes - 1} "
        "(0 is the background)"
    )
