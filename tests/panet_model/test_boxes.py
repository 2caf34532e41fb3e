"""Under bf16 autocast, anchors, proposals and decoded boxes are float32, as in evaluation.

The image is COCO-sized (coordinates up to 1088), where bfloat16 steps are 4-8 px.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList

from panet_model import PANetConfig
from panet_model.build import build_roi_heads, build_rpn

IMAGE = (608, 1088)
CHANNELS = 4  # feature channels: enough for the RPN's arithmetic, cheap on CPU
STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}  # P2..P6
# CUDA autocasts other ops (convolutions, NMS, RoIAlign) through other kernels.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda:0",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


def rpn_inputs(device: str = "cpu") -> tuple[ImageList, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = ImageList(torch.zeros(1, 3, *IMAGE, device=device), [IMAGE])
    features = {
        name: torch.randn(1, CHANNELS, IMAGE[0] // s, IMAGE[1] // s, generator=g).to(device)
        for name, s in STRIDES.items()
    }
    return images, features


def bf16_autocast(device: str = "cpu", enabled: bool = True) -> torch.autocast:
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


@pytest.mark.parametrize("device", DEVICES)
def test_anchors_under_bf16_autocast_are_the_float32_anchors(device: str) -> None:
    anchor_generator = build_rpn(PANetConfig.preset("panet"), CHANNELS).anchor_generator
    images, features = rpn_inputs(device)
    expected = anchor_generator(images, list(features.values()))[0]
    assert not torch.equal(expected.bfloat16().float(), expected)  # bf16 would move them
    with bf16_autocast(device):
        got = anchor_generator(images, [f.bfloat16() for f in features.values()])[0]
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    # The bf16 call left the generator's cell anchors as they were.
    assert torch.equal(anchor_generator(images, list(features.values()))[0], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_rpn_proposals_under_bf16_autocast_equal_float32(device: str) -> None:
    """The same head predictions give the same proposals with bf16 or float32 features.

    The head's outputs are fixed to what it predicts under bf16 AMP (bfloat16 values; float32
    copies of them in the float32 run), so that only the anchors, the decoding and the
    objectness ranking differ between the runs.
    """
    rpn = build_rpn(PANetConfig.preset("panet"), CHANNELS).eval().to(device)
    images, features = rpn_inputs(device)
    low = {k: v.bfloat16() for k, v in features.items()}
    with torch.no_grad(), bf16_autocast(device):
        objectness, deltas = rpn.head(list(low.values()))
    assert objectness[0].dtype == torch.bfloat16
    proposals = {}
    runs = {"fp32": (features, torch.float32), "bf16": (low, torch.bfloat16)}
    for name, (feats, dtype) in runs.items():
        fixed = ([o.to(dtype) for o in objectness], [d.to(dtype) for d in deltas])
        hook = rpn.head.register_forward_hook(lambda *_, out=fixed: out)
        try:
            with torch.no_grad(), bf16_autocast(device, enabled=name == "bf16"):
                proposals[name] = rpn(images, feats)[0][0]
        finally:
            hook.remove()
    assert proposals["bf16"].dtype == torch.float32
    assert len(proposals["fp32"]) > 100
    assert torch.equal(proposals["bf16"], proposals["fp32"])


def test_detection_boxes_decode_in_float32() -> None:
    """The box head's bf16 deltas decode against float32 proposals in float32."""
    cfg = PANetConfig.preset("panet")
    box_coder = build_roi_heads(cfg, CHANNELS, num_classes=3).box_coder
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=g) * torch.tensor([IMAGE[1], IMAGE[0]])
    proposals = torch.cat([xy, xy + 16 + 200 * torch.rand(50, 2, generator=g)], dim=1)
    deltas = torch.randn(50, 3 * 4, generator=g).bfloat16()
    with bf16_autocast():
        got = box_coder.decode(deltas, [proposals])
    assert got.dtype == torch.float32
    assert torch.equal(got, box_coder.decode(deltas.float(), [proposals]))
