"""Deformable convolution in the trunk: the plain conv at zero offsets, gradients, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import DeformConv2d

from panet_model import PANetConfig, build_panet
from panet_model.dcn import DeformConv
from tests.panet_model.conftest import make_sample
from tests.panet_model.test_build import NUM_CLASSES, train_step_and_eval


def test_zero_offsets_give_exactly_the_plain_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True).double()
    # Integer-valued inputs and weights: every product and sum is exact in float64, so the
    # two implementations (im2col + matmul, direct convolution) must agree bit for bit.
    conv.weight.data = torch.randint(-3, 4, conv.weight.shape).double()
    conv.bias.data = torch.randint(-3, 4, conv.bias.shape).double()
    dcn = DeformConv.from_conv(conv).double()
    assert isinstance(dcn, DeformConv2d)
    x = torch.randint(-5, 6, (2, 6, 13, 17)).double()
    assert torch.equal(dcn(x), conv(x))
    assert not dcn.conv_offset.weight.any() and not dcn.conv_offset.bias.any()
    # Random real values: equal to float64 rounding.
    x = torch.randn(2, 6, 13, 17, dtype=torch.float64)
    torch.testing.assert_close(dcn(x), conv(x), rtol=0, atol=1e-12)


def test_grouped_conv_and_nonzero_offsets_deform() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    dcn = DeformConv.from_conv(conv)
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(dcn(x), conv(x), rtol=1e-5, atol=1e-5)
    # A whole-pixel shift to the right of every tap is the plain conv of the shifted input
    # (except in column 0, whose left tap reads x[0] instead of the shifted input's padding).
    offset = torch.zeros(1, 18, 9, 9)
    offset[:, 1::2] = 1.0  # (dy, dx) pairs: dx = 1
    shifted = F.pad(x[..., 1:], (0, 1))
    torch.testing.assert_close(
        dcn(x, offset)[..., 1:], conv(shifted)[..., 1:], rtol=1e-5, atol=1e-5
    )


def test_forward_backward_on_cpu_reaches_the_offset_branch() -> None:
    torch.manual_seed(0)
    dcn = DeformConv(4, 6, 3, stride=1, padding=1)
    torch.nn.init.normal_(dcn.conv_offset.weight, std=0.1)  # non-zero offsets: a real deform
    x = torch.randn(2, 4, 10, 12, requires_grad=True)
    out = dcn(x)
    assert out.shape == (2, 6, 10, 12)
    out.square().sum().backward()
    for grad in (x.grad, dcn.weight.grad, dcn.conv_offset.weight.grad, dcn.conv_offset.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # At zero init the offset branch still gets a gradient (it can start learning).
    fresh = DeformConv(4, 6, 3, padding=1)
    fresh(torch.randn(1, 4, 8, 8)).sum().backward()
    assert fresh.conv_offset.bias.grad.abs().sum() > 0


def test_config_picks_stages_and_rejects_bad_ones() -> None:
    model = build_panet(PANetConfig.preset("tiny").override({"backbone.dcn_stages": [5]}), 3)
    body = model.backbone.body
    assert all(isinstance(block.conv2, DeformConv) for block in body.layer4)
    assert not any(isinstance(m, DeformConv) for m in body.layer3.modules())
    with pytest.raises(ValueError, match="backbone.dcn_stages"):
        PANetConfig.preset("tiny").override({"backbone.dcn_stages": [1]})
    with pytest.raises(ValueError, match="backbone.dcn_stages"):
        PANetConfig.preset("tiny").override({"backbone.dcn_stages": [4, 4]})


def test_plain_checkpoint_loads_strictly_and_into_the_dcn_model() -> None:
    """A checkpoint without DCN keeps its keys; the DCN model adds only the offset branches and
    gives the plain model's outputs with them at zero."""
    torch.manual_seed(0)
    cfg = PANetConfig.preset("tiny").override(
        {"transform.min_size": (128,), "transform.max_size": 160}
    )
    plain = build_panet(cfg, NUM_CLASSES).eval()
    state = plain.state_dict()
    assert not any("conv_offset" in k for k in state)
    build_panet(cfg, NUM_CLASSES).load_state_dict(state, strict=True)
    dcn = build_panet(cfg.override({"backbone.dcn_stages": [4, 5]}), NUM_CLASSES).eval()
    missing, unexpected = dcn.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing and all(".conv2.conv_offset." in k for k in missing)
    assert all(k.startswith(("backbone.body.layer3.", "backbone.body.layer4.")) for k in missing)
    image = make_sample(120, 150, 2, NUM_CLASSES)[0]
    with torch.no_grad():
        a, b = plain([image])[0], dcn([image])[0]
    torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("preset", ["tiny", "panet"])
def test_dcn_option_trains_a_step(preset: str) -> None:
    torch.manual_seed(0)
    cfg = PANetConfig.preset(preset).override(
        {
            "transform.min_size": (128,),
            "transform.max_size": 160,
            "roi.batch_size_per_image": 64,
            "backbone.dcn_stages": [4, 5],
        }
    )
    model = build_panet(cfg, NUM_CLASSES)
    train_step_and_eval(model)
    offsets = [m.conv_offset for m in model.modules() if isinstance(m, DeformConv)]
    assert len(offsets) == (4 if preset == "tiny" else 9)
    assert all(o.weight.grad is not None for o in offsets)
