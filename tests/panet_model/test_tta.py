"""Test-time tricks (paper Sec. 4.2) on constructed inputs: voting, flip symmetry, scales."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from panet_model import PANetConfig, build_panet
from panet_model.config import TestConfig as Tricks
from panet_model.tta import (
    VOTE_CHUNK,
    box_voting,
    detect,
    mask_voting,
    paste_and_vote,
    uses_tricks,
)

NUM_CLASSES = 4


def test_box_voting_of_identical_boxes_returns_that_box() -> None:
    box = torch.tensor([[10.25, 20.5, 60.75, 90.0]])
    boxes = box.repeat(5, 1)
    scores = torch.tensor([0.9, 0.3, 0.7, 0.2, 0.05])
    labels = torch.full((5,), 2)
    voted = box_voting(box, torch.tensor([2]), boxes, scores, labels, 0.8)
    assert torch.equal(voted, box)


def test_box_voting_weights_by_score_within_class_and_iou() -> None:
    kept = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 100.0, 100.0],  # the kept box itself
            [0.0, 0.0, 100.0, 110.0],  # IoU 0.91: votes
            [0.0, 0.0, 100.0, 200.0],  # IoU 0.5: below the threshold
            [2.0, 2.0, 100.0, 100.0],  # another class
        ]
    )
    scores = torch.tensor([0.6, 0.2, 0.9, 0.9])
    labels = torch.tensor([1, 1, 1, 3])
    voted = box_voting(kept, torch.tensor([1]), boxes, scores, labels, 0.8)
    expected = (0.6 * boxes[0] + 0.2 * boxes[1]) / 0.8
    torch.testing.assert_close(voted[0], expected)


def test_mask_voting_of_identical_masks_returns_that_mask() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 24, 32, generator=g)
    mask[:, 4:20, 6:26] += 1.0  # a foreground blob, probabilities elsewhere too
    mask = mask.clamp(max=1.0)
    pool = mask.repeat(4, 1, 1)
    scores = torch.tensor([0.8, 0.5, 0.4, 0.1])
    labels = torch.ones(4, dtype=torch.long)
    voted = mask_voting(mask.clone(), torch.tensor([1]), pool, scores, labels, 0.5)
    torch.testing.assert_close(voted, mask, rtol=0, atol=1e-6)
    binary = (mask > 0.5).float()
    voted = mask_voting(
        binary.clone(),
        torch.tensor([1]),
        binary.repeat(3, 1, 1),
        scores[:3],
        torch.ones(3, dtype=torch.long),
        0.5,
    )
    assert torch.equal(voted, binary)


def test_mask_voting_weights_voters_above_the_iou() -> None:
    a = torch.zeros(1, 10, 10)
    a[0, :, :5] = 0.9  # left half
    close = torch.zeros(10, 10)
    close[:, :4] = 0.7  # IoU 0.8 with a: votes
    far = torch.zeros(10, 10)
    far[:, 5:] = 1.0  # disjoint: does not vote
    pool = torch.stack([a[0], close, far])
    scores = torch.tensor([0.5, 0.25, 1.0])
    voted = mask_voting(a.clone(), torch.tensor([1]), pool, scores, torch.tensor([1, 1, 1]), 0.5)
    expected = (0.5 * a[0] + 0.25 * close) / 0.75
    torch.testing.assert_close(voted[0], expected)
    labels = torch.tensor([1, 1, 1])
    other_class = mask_voting(a.clone(), torch.tensor([2]), pool, scores, labels, 0.5)
    assert torch.equal(other_class, a)  # no voter of its class: unchanged


def dense_mask_voting(*args: Any, mask_threshold: float = 0.5) -> Tensor:
    """The reference, `mask_voting`'s arguments: float32 copies of every mask at once."""
    masks, mask_labels, pool, pool_scores, pool_labels, iou_threshold = args
    a = (masks > mask_threshold).flatten(1).to(torch.float32)  # (N, H * W)
    b = (pool > mask_threshold).flatten(1).to(torch.float32)  # (P, H * W)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = inter / union.clamp(min=1.0)
    votes = (iou >= iou_threshold) & (mask_labels[:, None] == pool_labels[None, :])
    weights = votes.to(pool.dtype) * pool_scores[None, :]
    total = weights.sum(dim=1)
    voted = (weights @ pool.flatten(1)) / total.clamp(min=torch.finfo(total.dtype).tiny)[:, None]
    return torch.where((total > 0)[:, None, None], voted.view_as(masks), masks)


def voting_case(n: int, p: int, size: tuple[int, int]) -> dict[str, Tensor]:
    """`n` kept detections of 3 classes and `p` candidates around them (jittered copies)."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    owner = torch.arange(p) % n  # the detection each candidate is a copy of
    corner = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    extent = torch.tensor([w * 0.1, h * 0.1]) * (1 + torch.rand(n, 2, generator=g))
    xy = corner[owner] + torch.randn(p, 2, generator=g) * 3
    probs = torch.rand(p, 28, 28, generator=g) * 0.4
    probs[:, 6:22, 6:22] += 0.6
    boxes = torch.cat([xy, xy + extent[owner]], dim=1)
    labels = owner % 3 + 1
    masks = paste_masks_in_image(probs[:n, None], boxes[:n], size)[:, 0]  # the kept ones
    scores = torch.rand(p, generator=g)
    return {"masks": masks, "labels": labels[:n], "probs": probs, "boxes": boxes,
            "scores": scores, "pool_labels": labels}  # fmt: skip


def test_chunked_mask_voting_equals_the_dense_computation() -> None:
    c = voting_case(6, 3 * VOTE_CHUNK - 2, (96, 128))
    pool = paste_masks_in_image(c["probs"][:, None], c["boxes"], (96, 128))[:, 0]
    args = (c["scores"], c["pool_labels"], 0.5)
    expected = dense_mask_voting(c["masks"], c["labels"], pool, *args)
    assert not torch.equal(expected, c["masks"])  # some masks have voters
    got = mask_voting(c["masks"].clone(), c["labels"], pool, *args)
    torch.testing.assert_close(got, expected)
    got = paste_and_vote(c["masks"].clone(), c["labels"], c["probs"], c["boxes"], *args)
    torch.testing.assert_close(got, expected)


def rss_peak_and_now() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(  # type: ignore[return-value]
        int(re.search(rf"{key}:\s+(\d+) kB", status)[1]) * 1024 for key in ("VmHWM", "VmRSS")
    )


def peak_bytes(fn, *args) -> tuple[Tensor, int]:  # noqa: ANN001
    """fn(*args) and the peak of resident memory above the resident memory before it."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = rss_peak_and_now()[1]
    out = fn(*args)
    return out, rss_peak_and_now()[0] - before


def can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs")
def test_mask_voting_memory_is_bounded() -> None:
    """48 detections at 512 x 1024: a third of the dense computation's peak, the same result.

    The dense computation holds the pasted pool, float32 copies of every binary mask and the
    voted masks at once (more than 5 GB at 2048 x 1024 with 100 detections).
    """
    size = (512, 1024)
    c = voting_case(48, 48, size)

    def dense() -> Tensor:
        pool = paste_masks_in_image(c["probs"][:, None], c["boxes"], size)[:, 0]
        return dense_mask_voting(c["masks"], c["labels"], pool, c["scores"], c["pool_labels"], 0.5)

    expected, dense_peak = peak_bytes(dense)
    masks = c["masks"].clone()
    args = (masks, c["labels"], c["probs"], c["boxes"], c["scores"], c["pool_labels"], 0.5)
    got, peak = peak_bytes(paste_and_vote, *args)
    assert got is masks  # voted in place
    torch.testing.assert_close(got, expected)
    assert peak < dense_peak / 3, (peak, dense_peak)


class LeftProposals(nn.Module):
    """An RPN stand-in: two fixed proposals in the left half of every view."""

    def forward(self, images, features):
        h, w = images.image_sizes[0]
        rel = torch.tensor([[0.08, 0.25, 0.40, 0.75], [0.15, 0.10, 0.30, 0.40]])
        return [rel * torch.tensor([w, h, w, h], dtype=torch.float32)], {}


def tiny_model(**test) -> nn.Module:
    torch.manual_seed(0)
    cfg = PANetConfig.preset("tiny").override(
        {"transform.min_size": (128,), "transform.max_size": 192, "roi.score_thresh": 0.0}
    )
    model = build_panet(cfg.override({f"test.{k}": v for k, v in test.items()}), NUM_CLASSES)
    return model.eval()


def mirror(boxes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def test_flip_testing_of_a_symmetric_image_gives_symmetric_output() -> None:
    model = tiny_model()
    model.rpn = LeftProposals()
    half = torch.rand(3, 96, 64, generator=torch.Generator().manual_seed(1))
    image = torch.cat([half, half.flip(-1)], dim=-1)  # (3, 96, 128), left-right symmetric
    width = image.shape[-1]
    with torch.no_grad():
        plain = detect(model, [image], Tricks())[0]
        flipped = detect(model, [image], Tricks(flip=True))[0]
    # Without flip testing everything is on the left, where the proposals are: not symmetric.
    assert len(plain["boxes"]) > 0 and bool((plain["boxes"][:, 2] < width / 2).all())
    boxes, scores, labels = flipped["boxes"], flipped["scores"], flipped["labels"]
    masks = flipped["masks"][:, 0] > 0.5
    assert len(boxes) == 2 * len(plain["boxes"])
    mirrored = mirror(boxes, width)
    for i in range(len(boxes)):
        # Its mirror image is a detection too: same class and score, mirrored mask.
        j = int(((mirrored - boxes[i]).abs().sum(1) + 1e3 * (labels != labels[i])).argmin())
        torch.testing.assert_close(mirrored[j], boxes[i], rtol=0, atol=1e-3)
        assert labels[j] == labels[i]
        torch.testing.assert_close(scores[j], scores[i], rtol=0, atol=1e-6)
        inter = (masks[i] & masks[j].flip(-1)).sum()
        union = (masks[i] | masks[j].flip(-1)).sum()
        assert union == 0 or inter / union >= 0.95


def test_one_view_without_voting_is_the_plain_model() -> None:
    model = tiny_model()
    image = torch.rand(3, 100, 140, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model([image])[0]
        same = detect(model, [image], Tricks())[0]
    assert len(plain["boxes"]) > 0
    torch.testing.assert_close(same["boxes"], plain["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(same["scores"], plain["scores"])
    assert torch.equal(same["labels"], plain["labels"])
    torch.testing.assert_close(same["masks"], plain["masks"], rtol=0, atol=1e-3)


def test_a_test_scale_is_the_model_at_that_scale_and_scales_pool() -> None:
    model = tiny_model()
    image = torch.rand(3, 100, 140, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        at_96 = detect(model, [image], Tricks(scales=(96,)))[0]
        model.transform.min_size = (96,)
        plain_96 = model([image])[0]
        model.transform.min_size = (128,)
        both = detect(model, [image], Tricks(scales=(96, 160)))[0]
    torch.testing.assert_close(at_96["boxes"], plain_96["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(at_96["scores"], plain_96["scores"])
    assert both["masks"].shape[-2:] == (100, 140)
    assert not torch.equal(both["scores"], at_96["scores"])
    # The long-edge cap bounds a scale: 400 on a 100 x 140 image would be 400 x 560.
    with torch.no_grad():
        capped = detect(model, [image], Tricks(scales=(400,), max_size=140))[0]
        model.transform.min_size, model.transform.max_size = (100,), 140
        native = model([image])[0]
    torch.testing.assert_close(capped["scores"], native["scores"])


@pytest.mark.parametrize(
    "test",
    [
        {"flip": True},
        {"box_vote": True},
        {"mask_vote": True},
        {"scales": [96, 128]},
        {"flip": True, "scales": [96, 128]},
    ],
)
def test_model_forward_uses_its_test_config(test: dict) -> None:
    model = tiny_model(**test)
    assert uses_tricks(model.test)
    image = torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model([image])[0]
        expected = detect(model, [image], model.test)[0]
        model.test = Tricks()
        plain = model([image])[0]
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(out[key], expected[key])
    assert out["masks"].shape[-2:] == (90, 120)
    differs = [not torch.equal(out[k], plain[k]) for k in ("boxes", "scores", "masks")]
    assert any(differs)
    model.train()  # training ignores the test config
    assert isinstance(
        model(
            [image],
            [
                {
                    "boxes": torch.tensor([[5.0, 5.0, 50.0, 60.0]]),
                    "labels": torch.tensor([1]),
                    "masks": torch.ones(1, 90, 120, dtype=torch.uint8),
                }
            ],
        ),
        dict,
    )
