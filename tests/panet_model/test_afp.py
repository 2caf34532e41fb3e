"""Adaptive feature pooling, per-level layers, fusion and the Figure 3 diagnostic."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import roi_align

from panet_model import PANetConfig, build_panet
from panet_model.afp import AdaptiveRoIPool, LevelConv2d, LevelFusion, LevelLinear, LevelNorm
from panet_model.diagnostics import level_share


def features(channels: int = 8, size: int = 64) -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        (str(i), torch.rand(2, channels, size >> (i + 2), size >> (i + 2), generator=g))
        for i in range(4)
    )


def boxes() -> list[torch.Tensor]:
    return [
        torch.tensor([[1.0, 2.0, 30.0, 40.0], [10.0, 10.0, 12.0, 13.0]]),
        torch.tensor([[0.0, 0.0, 64.0, 64.0]]),
    ]


def test_single_level_equals_roi_align() -> None:
    feats = features()
    pool = AdaptiveRoIPool(["1"], 7, 2)
    out = pool(feats, boxes(), [(64, 64), (64, 64)])
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes())]
    )
    expected = roi_align(feats["1"], rois, (7, 7), spatial_scale=1 / 8, sampling_ratio=2)
    assert out.shape == (1, 3, 8, 7, 7)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)


def test_all_levels_pooled_for_every_roi() -> None:
    feats = features()
    out = AdaptiveRoIPool(["0", "1", "2", "3"], 7, 2)(feats, boxes(), [(64, 64)] * 2)
    assert out.shape == (4, 3, 8, 7, 7)
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes())]
    )
    for level in range(4):
        expected = roi_align(feats[str(level)], rois, (7, 7), 1 / 2 ** (level + 2), 2)
        torch.testing.assert_close(out[level], expected, rtol=0, atol=1e-6)


def test_empty_rois() -> None:
    out = AdaptiveRoIPool(["0", "1", "2", "3"], 7, 2)(
        features(), [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64)] * 2
    )
    assert out.shape == (4, 0, 8, 7, 7)


@pytest.mark.parametrize("op", ["max", "sum"])
def test_fusion(op: str) -> None:
    x = torch.randn(4, 5, 6)
    expected = x.amax(0) if op == "max" else x.sum(0)
    torch.testing.assert_close(LevelFusion(op)(x), expected)


def test_level_linear_impls_agree_and_levels_are_independent() -> None:
    torch.manual_seed(0)
    layer = LevelLinear(4, 12, 5, impl="grouped")
    x = torch.randn(4, 3, 12)
    grouped = layer(x)
    layer.impl = "loop"
    torch.testing.assert_close(layer(x), grouped)
    for level in range(4):
        torch.testing.assert_close(
            grouped[level],
            torch.nn.functional.linear(x[level], layer.weight[level], layer.bias[level]),
        )
    # Independent initialisation and independent gradients per level.
    assert not torch.equal(layer.weight[0], layer.weight[1])
    layer.impl = "grouped"
    layer(x)[2].sum().backward()
    assert layer.weight.grad[2].abs().sum() > 0
    assert layer.weight.grad[[0, 1, 3]].abs().sum() == 0


def test_level_conv_impls_agree_and_levels_are_independent() -> None:
    torch.manual_seed(0)
    conv = LevelConv2d(4, 6, 8, impl="grouped")
    x = torch.randn(4, 3, 6, 7, 7)
    grouped = conv(x)
    assert grouped.shape == (4, 3, 8, 7, 7)
    conv.impl = "loop"
    torch.testing.assert_close(conv(x), grouped, rtol=1e-5, atol=1e-5)
    weights = conv.weight.view(4, 8, 6, 3, 3)
    for level in range(4):
        expected = torch.nn.functional.conv2d(
            x[level], weights[level], conv.bias.view(4, 8)[level], padding=1
        )
        torch.testing.assert_close(grouped[level], expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(weights[0], weights[1])
    conv.impl = "grouped"
    conv(x)[1].sum().backward()
    grads = conv.weight.grad.view(4, 8, 6, 3, 3)
    assert grads[1].abs().sum() > 0 and grads[[0, 2, 3]].abs().sum() == 0
    assert conv(torch.zeros(4, 0, 6, 7, 7)).shape == (4, 0, 8, 7, 7)


@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_level_norm_is_per_level(kind: str) -> None:
    norm = LevelNorm(kind, 4, 32, dim=2).train()
    x = torch.randn(4, 6, 32, 3, 3) * torch.arange(1, 5).view(4, 1, 1, 1, 1) + 10
    out = norm(x)
    # Each level is normalised on its own statistics, whatever its scale and offset.
    reference = torch.nn.BatchNorm2d(32) if kind == "bn" else torch.nn.GroupNorm(32, 32)
    for level in range(4):
        torch.testing.assert_close(out[level], reference(x[level]), rtol=1e-4, atol=1e-4)


def shared_parameters(model: torch.nn.Module) -> list[str]:
    seen: dict[int, str] = {}
    shared = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            shared.append(f"{seen[id(p)]} == {name}")
        seen[id(p)] = name
    return shared


def test_built_panet_has_independent_per_level_layers(tiny_cfg: PANetConfig) -> None:
    model = build_panet(tiny_cfg, num_classes=4)
    # The bug seen in a Detectron2 port: one module inserted once per level.
    assert shared_parameters(model) == []
    heads = model.roi_heads
    box_conv = heads.box_head.conv1[0]
    mask_conv = getattr(heads.mask_head, "0")[0]
    for layer in (box_conv, mask_conv):
        assert isinstance(layer, LevelConv2d)
        w = layer.weight.view(4, layer.out_channels, *layer.weight.shape[1:])
        assert all(not torch.equal(w[0], w[i]) for i in range(1, 4))


def test_ff_fc_shape_in_panet() -> None:
    model = build_panet(PANetConfig.preset("panet"), num_classes=81)
    fc = model.roi_heads.mask_head.ff.fc
    assert fc.weight.shape == (784, 128 * 14 * 14)  # (C/2)*14*14 -> 28*28


def test_level_share_diagnostic(tiny_cfg: PANetConfig) -> None:
    torch.manual_seed(0)
    model = build_panet(tiny_cfg.override({"roi.score_thresh": 0.0}), num_classes=4)
    grad_modes = []  # a training step calls it: no autograd graph of the whole model
    model.roi_heads.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    shares = level_share(model, [torch.rand(3, 128, 160), torch.rand(3, 150, 128)])
    assert grad_modes == [False]
    assert set(shares) == {"box", "mask"}
    box = shares["box"]
    assert box.shape == (4, 4)
    rows = box.sum(1)
    assert torch.all(((rows - 1).abs() < 1e-9) | (rows == 0))
    assert rows.sum() >= 1
    # Recording is switched off again afterwards.
    assert model.roi_heads.box_roi_pool.recorder is None
    assert model.roi_heads.box_head.fusion.recorder is None
