"""Test-time tricks of the paper's COCO entry (Sec. 4.2): multi-scale and horizontal-flip
testing, box voting and mask voting.

`detect` runs a `PANet` in eval mode on several views of each image (every scale of
`TestConfig.scales`, each also flipped with `flip`) and merges them as Detectron does:

1. Boxes: every view's class-specific candidates (scored, before NMS) are mapped back to the
   original image and pooled; per-class NMS over the pool keeps the top `detections_per_img`.
2. Box voting (`box_vote`): each kept box becomes the score-weighted mean of the pooled boxes of
   its class that overlap it by at least `box_vote_iou` (Detectron's BBOX_VOTE).
3. Masks: the mask branch predicts every kept box in every view; the M x M probabilities are
   averaged over the views (flipped views flipped back), then pasted into the image.
4. Mask voting (`mask_vote`): each mask becomes the score-weighted mean of the pasted masks of
   the highest-scoring pooled candidates of its class whose mask IoU with it is at least
   `mask_vote_iou` (MNC's mask voting).

With a single view and no voting the result is the model's own output, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import _resize_image_and_masks, resize_boxes
from torchvision.ops import boxes as box_ops

from panet_model.config import TestConfig


def uses_tricks(test: TestConfig | None) -> bool:
    """True if `test` asks for anything but the model's plain single-scale inference."""
    if test is None:
        return False
    return bool(test.scales or test.max_size or test.flip or test.box_vote or test.mask_vote)


@dataclass
class View:
    """One test view of an image: its resize, flip, features and proposals."""

    flip: bool
    size: tuple[int, int]  # (h, w) after the resize, before padding
    features: dict[str, Tensor]
    proposals: Tensor  # (R, 4) in the view's coordinates


def detect(model: nn.Module, images: list[Tensor], test: TestConfig) -> list[dict[str, Tensor]]:
    """Detections of every image under the test-time tricks of `test`.

    Args:
        model: a `PANet` (any torchvision-style GeneralizedRCNN with RoIHeads), in eval mode.
        images: (3, H, W) float images in [0, 1].
        test: which tricks to use.

    Returns:
        Per image {"boxes" (N, 4) x1y1x2y2, "labels" (N,), "scores" (N,), "masks" (N, 1, H, W)
        probabilities (with a mask head)} at the original image size, as the model returns.
    """
    return [_detect_one(model, image, test) for image in images]


def _detect_one(model: nn.Module, image: Tensor, test: TestConfig) -> dict[str, Tensor]:
    rh = model.roi_heads
    h, w = image.shape[-2:]
    scales = test.scales or (model.transform.min_size[-1],)
    max_size = test.max_size or model.transform.max_size
    views, pooled = [], []
    for scale in scales:
        for flip in (False, True) if test.flip else (False,):
            view = _view(model, image, scale, max_size, flip)
            views.append(view)
            boxes, scores, labels = _box_candidates(model, view)
            pooled.append((_to_image(boxes, view, (h, w)), scores, labels))
    boxes = torch.cat([p[0] for p in pooled])
    scores = torch.cat([p[1] for p in pooled])
    labels = torch.cat([p[2] for p in pooled])
    keep = box_ops.batched_nms(boxes, scores, labels, rh.nms_thresh)[: rh.detections_per_img]
    out = {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
    if test.box_vote:
        out["boxes"] = box_voting(
            out["boxes"], out["labels"], boxes, scores, labels, test.box_vote_iou
        )
    if not rh.has_mask():
        return out
    probs = _mask_probs(model, views, out["boxes"], out["labels"], (h, w))
    masks = paste_masks_in_image(probs[:, None], out["boxes"], (h, w))  # (N, 1, H, W)
    if test.mask_vote and len(keep):
        top = scores.argsort(descending=True)[: rh.detections_per_img]
        pool_probs = _mask_probs(model, views, boxes[top], labels[top], (h, w))
        paste_and_vote(
            masks[:, 0],  # (N, 1, H, W) -> (N, H, W), a view: voted in place
            out["labels"],
            pool_probs,
            boxes[top],
            scores[top],
            labels[top],
            test.mask_vote_iou,
        )
    out["masks"] = masks
    return out


def _view(model: nn.Module, image: Tensor, scale: int, max_size: int, flip: bool) -> View:
    """Resize (short side `scale`, long side <= `max_size`) and flip, then backbone and RPN."""
    t = model.transform
    x = t.normalize(image.flip(-1) if flip else image)
    x, _ = _resize_image_and_masks(x, scale, max_size, None, t.fixed_size)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    batch = ImageList(t.batch_images([x], size_divisible=t.size_divisible), [size])
    features = model.backbone(batch.tensors)
    if isinstance(features, Tensor):
        features = {"0": features}
    proposals, _ = model.rpn(batch, features)
    return View(flip, size, features, proposals[0])


def _box_candidates(model: nn.Module, view: View) -> tuple[Tensor, Tensor, Tensor]:
    """Class-specific boxes of a view above the score threshold, before NMS.

    `RoIHeads.postprocess_detections` without its NMS and top-k.

    Returns:
        boxes (K, 4) in view coordinates, scores (K,), labels (K,) in 1..C-1.
    """
    rh = model.roi_heads
    feats = rh.box_head(rh.box_roi_pool(view.features, [view.proposals], [view.size]))
    class_logits, box_regression = rh.box_predictor(feats)
    boxes = rh.box_coder.decode(box_regression, [view.proposals])  # (R, C, 4)
    boxes = box_ops.clip_boxes_to_image(boxes, view.size)
    scores = F.softmax(class_logits, -1)  # (R, C)
    labels = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    # Drop the background; every (RoI, class) pair is a candidate: (R, C - 1, 4) -> (K, 4)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:]
    labels = labels.reshape(-1)
    keep = torch.where(scores > rh.score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    return boxes[keep], scores[keep], labels[keep]


def _flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror x1y1x2y2 boxes in an image `width` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _to_image(boxes: Tensor, view: View, image_size: tuple[int, int]) -> Tensor:
    """View coordinates -> original image coordinates."""
    boxes = resize_boxes(boxes, view.size, image_size)
    return _flip_boxes(boxes, image_size[1]) if view.flip else boxes


def _to_view(boxes: Tensor, view: View, image_size: tuple[int, int]) -> Tensor:
    """Original image coordinates -> view coordinates."""
    if view.flip:
        boxes = _flip_boxes(boxes, image_size[1])
    return resize_boxes(boxes, image_size, view.size)


def _mask_probs(
    model: nn.Module,
    views: list[View],
    boxes: Tensor,
    labels: Tensor,
    image_size: tuple[int, int],
) -> Tensor:
    """Mask probabilities of `boxes` (image coordinates) for their labels, averaged over views.

    Returns:
        (N, M, M) probabilities in each box's frame (M = 2 x mask pool size).
    """
    rh = model.roi_heads
    total: Tensor | None = None
    for view in views:
        rois = _to_view(boxes, view, image_size)
        logits = rh.mask_predictor(
            rh.mask_head(rh.mask_roi_pool(view.features, [rois], [view.size]))
        )  # (N, C, M, M)
        probs = logits[torch.arange(len(labels), device=labels.device), labels].sigmoid()
        if view.flip:
            probs = probs.flip(-1)  # the box frame of a flipped view is mirrored too
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(views)


def box_voting(
    kept_boxes: Tensor,
    kept_labels: Tensor,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float,
) -> Tensor:
    """Replace each kept box by the score-weighted mean of the candidates that vote for it.

    A candidate votes for a kept box of its own class that it overlaps with IoU >= threshold.
    Scores are left as they are (Detectron's "ID" scoring).

    Args:
        kept_boxes: (N, 4) boxes after NMS; kept_labels: (N,).
        boxes, scores, labels: (K, 4), (K,), (K,): every candidate before NMS.
        iou_threshold: the smallest IoU of a voter.

    Returns:
        (N, 4) voted boxes; a kept box without voters stays as it is.
    """
    if kept_boxes.numel() == 0 or boxes.numel() == 0:
        return kept_boxes
    iou = box_ops.box_iou(kept_boxes, boxes)  # (N, K)
    votes = (iou >= iou_threshold) & (kept_labels[:, None] == labels[None, :])
    weights = votes.to(scores.dtype) * scores[None, :]  # (N, K)
    total = weights.sum(dim=1, keepdim=True)
    # The mean as a shift of the kept box, so identical voters leave it exactly as it is.
    shift = (weights[:, :, None] * (boxes[None, :, :] - kept_boxes[:, None, :])).sum(1)  # (N, 4)
    return kept_boxes + shift / total.clamp(min=torch.finfo(total.dtype).tiny)


# Mask voting holds the pool's probabilities a chunk of candidates at a time, binary masks at one
# byte a pixel, and float32 copies of binary masks a block of pixels at a time: at 2048 x 1024,
# one float32 copy of 100 masks is 800 MB.
VOTE_CHUNK = 8  # candidates pasted at a time
PIXEL_BLOCK = 1 << 16  # pixels per float32 block of the intersection product (exact counts)


def mask_voting(
    masks: Tensor,
    mask_labels: Tensor,
    pool: Tensor,
    pool_scores: Tensor,
    pool_labels: Tensor,
    iou_threshold: float,
    mask_threshold: float = 0.5,
) -> Tensor:
    """Replace each mask by the score-weighted mean of the pool masks that vote for it.

    A pool mask votes for a mask of its own class whose binary mask (probability >
    `mask_threshold`) it overlaps with IoU >= threshold.

    Args:
        masks: (N, H, W) probabilities, contiguous; overwritten with the voted ones.
        mask_labels: (N,).
        pool: (P, H, W) probabilities of the candidates; pool_scores, pool_labels: (P,).
        iou_threshold: the smallest mask IoU of a voter.
        mask_threshold: probability above which a pixel is foreground.

    Returns:
        `masks`, voted; a mask without voters stays as it is.
    """
    return _vote(
        masks,
        mask_labels,
        lambda start, stop: pool[start:stop],
        pool_scores,
        pool_labels,
        iou_threshold,
        mask_threshold,
    )


def paste_and_vote(
    masks: Tensor,
    mask_labels: Tensor,
    pool_probs: Tensor,
    pool_boxes: Tensor,
    pool_scores: Tensor,
    pool_labels: Tensor,
    iou_threshold: float,
    mask_threshold: float = 0.5,
) -> Tensor:
    """`mask_voting` with a pool given in its boxes' frames, pasted `VOTE_CHUNK` at a time.

    Args:
        masks: (N, H, W) probabilities, contiguous; overwritten with the voted ones.
        mask_labels: (N,).
        pool_probs: (P, M, M) probabilities of the candidates in their boxes.
        pool_boxes: (P, 4) x1y1x2y2 boxes in the image; pool_scores, pool_labels: (P,).
        iou_threshold, mask_threshold: as for `mask_voting`.

    Returns:
        `masks`, voted, equal to `mask_voting` on the pasted pool.
    """
    size = (masks.shape[-2], masks.shape[-1])

    def pasted(start: int, stop: int) -> Tensor:
        # (c, M, M) -> (c, 1, H, W) -> (c, H, W)
        return paste_masks_in_image(pool_probs[start:stop, None], pool_boxes[start:stop], size)[
            :, 0
        ]

    return _vote(
        masks, mask_labels, pasted, pool_scores, pool_labels, iou_threshold, mask_threshold
    )


def _vote(
    masks: Tensor,
    mask_labels: Tensor,
    pool_chunk: Callable[[int, int], Tensor],
    pool_scores: Tensor,
    pool_labels: Tensor,
    iou_threshold: float,
    mask_threshold: float,
) -> Tensor:
    """Mask voting with the pool's probabilities a chunk of candidates at a time.

    Two passes over the pool: its binary masks (one byte a pixel) give the IoUs, then the
    chunks holding voters are fetched again and summed into the voted masks in place.
    """
    num_pool = len(pool_scores)
    if masks.numel() == 0 or num_pool == 0:
        return masks
    n = masks.shape[0]
    flat = masks.view(n, -1)  # (N, H, W) -> (N, H * W), the same memory
    chunks = [(s, min(s + VOTE_CHUNK, num_pool)) for s in range(0, num_pool, VOTE_CHUNK)]
    binary = flat > mask_threshold  # (N, H * W)
    pool_binary = torch.empty(num_pool, flat.shape[1], dtype=torch.bool, device=flat.device)
    for start, stop in chunks:
        # (c, H, W) -> (c, H * W)
        torch.gt(pool_chunk(start, stop).reshape(stop - start, -1), mask_threshold,
                 out=pool_binary[start:stop])  # fmt: skip
    inter, area, pool_area = _overlaps(binary, pool_binary)  # (N, P), (N,), (P,)
    union = area[:, None] + pool_area[None, :] - inter
    del binary, pool_binary
    iou = inter / union.clamp(min=1.0)
    votes = (iou >= iou_threshold) & (mask_labels[:, None] == pool_labels[None, :])
    weights = votes.to(flat.dtype) * pool_scores[None, :]  # (N, P)
    total = weights.sum(dim=1)
    voted = torch.nonzero(total > 0)[:, 0]  # (V,) masks with voters; the others stay
    if len(voted) == 0:
        return masks
    flat.index_fill_(0, voted, 0.0)
    for start, stop in chunks:
        w = weights[:, start:stop]  # (N, c)
        rows = torch.nonzero(w.sum(dim=1) > 0)[:, 0]  # the masks this chunk votes for
        if len(rows) == 0:
            continue
        pool = pool_chunk(start, stop).reshape(stop - start, -1)  # (c, H * W)
        for group in rows.split(VOTE_CHUNK):  # a (VOTE_CHUNK, H * W) product at most
            flat.index_add_(0, group, w[group] @ pool)
    flat.div_(torch.where(total > 0, total, torch.ones_like(total))[:, None])
    return masks


def _overlaps(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel counts of binary masks and of their pairwise intersections.

    Args:
        a: (N, L) bool; b: (C, L) bool.

    Returns:
        (N, C) pixels set in both, (N,) in a, (C,) in b; float32. One float32 product per block
        of `PIXEL_BLOCK` pixels (exact: a block's count is below 2^24), summed in float64
        (`x.sum(1)` on bool would convert all of `x` to int64 first, eight bytes a pixel).
    """
    inter = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    area_a = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    area_b = torch.zeros(b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], PIXEL_BLOCK):
        block = slice(start, start + PIXEL_BLOCK)
        fa, fb = a[:, block].to(torch.float32), b[:, block].to(torch.float32)
        inter += (fa @ fb.T).double()
        area_a += fa.sum(1).double()
        area_b += fb.sum(1).double()
    return inter.to(torch.float32), area_a.to(torch.float32), area_b.to(torch.float32)
