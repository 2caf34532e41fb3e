"""Anchors, box decoding and proposal ranking in float32, whatever dtype the activations have.

torchvision builds anchors in the dtype of the feature maps and decodes deltas in the dtype of
the predicted deltas. Under bf16 AMP both are bfloat16, whose 8-bit mantissa rounds image
coordinates to 4 px between 512 and 1024 and to 8 px beyond: neighbouring P2 anchors (stride 4)
merge, small anchors shift by half their size, proposals move by as much, and evaluation, which
runs in float32, uses anchors the RPN never trained on. bfloat16 objectness probabilities near 1
are 1/256 apart, so NMS ranks many proposals as ties. The classes here compute these in float32
(float64 stays float64); the heads' activations keep their AMP dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork


def box_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's `AnchorGenerator` whose anchors are float32 for half/bfloat16 features.

    torchvision's `forward` converts `cell_anchors` to the features' dtype in place, so one
    bfloat16 step would also leave them in bfloat16 for every later call.
    """

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        super().set_cell_anchors(box_dtype(dtype), device)


class Float32BoxCoder(BoxCoder):
    """torchvision's `BoxCoder` that decodes in float32 when the deltas are half/bfloat16."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """(K, 4 * C) deltas of (K, 4) boxes -> (K, 4 * C) boxes, in float32 or float64."""
        dtype = box_dtype(rel_codes.dtype, boxes.dtype)
        return super().decode_single(rel_codes.to(dtype), boxes.to(dtype))


class PANetRPN(RegionProposalNetwork):
    """torchvision's RPN with float32 decoding and objectness ranking.

    Give it a `Float32AnchorGenerator` for float32 anchors. The loss and the state dict are
    torchvision's; only the proposal arithmetic changes dtype.
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.box_coder = Float32BoxCoder(self.box_coder.weights)

    def filter_proposals(  # type: ignore[override]
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's top-k and NMS, on float32 objectness (a detached copy: no loss path)."""
        return super().filter_proposals(
            proposals,
            objectness.to(box_dtype(objectness.dtype)),
            image_shapes,
            num_anchors_per_level,
        )
