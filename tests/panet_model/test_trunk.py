"""Narrow ResNet trunks: torchvision's layout at any width, and the config's guard rails."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet

from panet_model import PANetConfig, build_panet
from panet_model.trunk import STAGES, NarrowResNet, build_trunk


@pytest.mark.parametrize("name", sorted(STAGES))
def test_width_64_is_torchvisions_resnet(name: str) -> None:
    """At the paper's width the narrow trunk is torchvision's, name for name and output for output."""
    block, layers = STAGES[name]
    ours = NarrowResNet(block, layers, 64, nn.BatchNorm2d).eval()
    theirs = getattr(resnet, name)(weights=None).eval()
    expected = {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    ours.load_state_dict(theirs.state_dict(), strict=False)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        trunk = nn.Sequential(*list(theirs.children())[:-2])  # without avgpool and fc
        torch.testing.assert_close(ours(x), trunk(x))


@pytest.mark.parametrize(("name", "c5"), [("resnet18", 256), ("resnet50", 1024)])
def test_half_width_stages(name: str, c5: int) -> None:
    trunk = build_trunk(name, 32, nn.BatchNorm2d)
    assert isinstance(trunk, NarrowResNet) and trunk.inplanes == c5
    out = trunk(torch.rand(2, 3, 96, 64))
    assert out.shape == (2, c5, 3, 2)  # stride 32
    full = build_trunk(name, 64, nn.BatchNorm2d).named_parameters()
    full_convs = sum(p.numel() for n, p in full if not n.startswith("fc."))
    assert sum(p.numel() for p in trunk.parameters()) < full_convs / 3.5  # convs: ~1/4


def test_narrow_model_wires_fpn_and_freezing() -> None:
    cfg = PANetConfig.preset("tiny").override(
        {"backbone.width": 16, "backbone.trainable_layers": 3, "transform.min_size": (96,)}
    )
    model = build_panet(cfg, 3)
    body = model.backbone.body
    assert body.layer1[0].conv1.in_channels == 16 and body.layer4[-1].conv2.out_channels == 128
    frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    feats = model.backbone(torch.rand(1, 3, 96, 128))
    assert [f.shape[1] for f in feats.values()] == [cfg.fpn.out_channels] * 5


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"backbone.width": 0}, "positive"),
        ({"backbone.width": 32, "backbone.name": "resnext101_32x8d"}, "only ResNets"),
    ],
)
def test_bad_width_names_the_key(updates: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"backbone\.width.*" + message.replace(".", r"\.")):
        PANetConfig.preset("tiny").override(updates)
