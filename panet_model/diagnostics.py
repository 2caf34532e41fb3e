"""Paper Figure 3: under AFP's max fusion, the share of features taken from each level.

Rows are the level FPN would have assigned the RoI to (level 1 = P2 ... level 4 = P5), columns
the level each fused element actually came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from panet_model.afp import AdaptiveRoIPool, LevelFusion, LevelShareRecorder


@contextmanager
def record_level_share(model: nn.Module) -> Iterator[dict[str, LevelShareRecorder]]:
    """Record level shares of the box and mask heads while the block runs.

    Yields:
        {"box": recorder, "mask": recorder} for the heads that fuse with max under AFP; empty
        when AFP is off or fuses with sum.
    """
    heads = model.roi_heads  # type: ignore[attr-defined]
    pairs = {
        "box": (heads.box_roi_pool, heads.box_head),
        "mask": (heads.mask_roi_pool, heads.mask_head),
    }
    recorders: dict[str, LevelShareRecorder] = {}
    wired: list[nn.Module] = []
    for name, (pool, head) in pairs.items():
        fusion = getattr(head, "fusion", None)
        if not isinstance(pool, AdaptiveRoIPool) or not isinstance(fusion, LevelFusion):
            continue
        if fusion.op != "max":
            continue
        recorder = LevelShareRecorder(len(pool.featmap_names))
        pool.recorder = recorder
        fusion.recorder = recorder
        wired += [pool, fusion]
        recorders[name] = recorder
    try:
        yield recorders
    finally:
        for module in wired:
            module.recorder = None  # type: ignore[assignment]


@torch.no_grad()
def level_share(model: nn.Module, images: list[Tensor]) -> dict[str, Tensor]:
    """Run inference on `images` and return the (L, L) share matrices of paper Figure 3.

    Args:
        model: a PANet with AFP and max fusion.
        images: (3, H, W) float images.

    Returns:
        {"box": (L, L), "mask": (L, L)}: row a, column s = share of fused elements taken
        from level s for RoIs FPN assigns to level a (rows sum to 1 where RoIs exist).
    """
    was_training = model.training
    model.eval()
    try:
        with record_level_share(model) as recorders:
            model(images)
    finally:
        model.train(was_training)
    return {name: rec.shares() for name, rec in recorders.items()}
