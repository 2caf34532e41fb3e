"""Shared helpers for the model tests: tiny images and targets."""

from __future__ import annotations

import pytest
import torch

from panet_model import PANetConfig


def make_sample(h: int, w: int, n: int, num_classes: int, seed: int = 0):
    """An image with `n` random rectangles as instances (boxes, labels, masks consistent)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g)
    boxes, masks = [], []
    for _ in range(n):
        x1 = int(torch.randint(0, w // 2, (1,), generator=g))
        y1 = int(torch.randint(0, h // 2, (1,), generator=g))
        x2 = x1 + int(torch.randint(8, w // 2, (1,), generator=g))
        y2 = y1 + int(torch.randint(8, h // 2, (1,), generator=g))
        m = torch.zeros(h, w, dtype=torch.uint8)
        m[y1:y2, x1:x2] = 1
        boxes.append([x1, y1, x2, y2])
        masks.append(m)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.randint(1, num_classes, (n,), generator=g),
        "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8),
    }
    return image, target


@pytest.fixture
def tiny_cfg() -> PANetConfig:
    """The tiny preset at a test-friendly scale."""
    return PANetConfig.preset("tiny").override(
        {"transform.min_size": (128,), "transform.max_size": 192}
    )
