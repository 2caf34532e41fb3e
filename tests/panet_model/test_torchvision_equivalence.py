"""`rbl` on ResNet-50 is torchvision's maskrcnn_resnet50_fpn, parameter for parameter."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from panet_model import PANetConfig, build_panet

NUM_CLASSES = 5
SIZE = {"min_size": 224, "max_size": 320}


def torchvision_maskrcnn() -> MaskRCNN:
    """What `maskrcnn_resnet50_fpn(num_classes=5, weights_backbone=...)` builds, minus download."""
    trunk = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return MaskRCNN(_resnet_fpn_extractor(trunk, 3), num_classes=NUM_CLASSES, **SIZE)


def rbl_config() -> PANetConfig:
    return PANetConfig.preset("rbl").override(
        {"transform.min_size": (SIZE["min_size"],), "transform.max_size": SIZE["max_size"]}
    )


@pytest.fixture(scope="module")
def reference() -> MaskRCNN:
    torch.manual_seed(0)
    model = torchvision_maskrcnn().eval()
    # Random weights give detections of every class above the 0.05 score threshold.
    return model


def test_state_dict_keys_and_shapes_match(reference: MaskRCNN) -> None:
    ours = build_panet(rbl_config(), num_classes=NUM_CLASSES).state_dict()
    theirs = reference.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # The same parameters are trainable (layers 2-4 of the trunk, FPN, heads).
    ours_trainable = {
        k for k, p in build_panet(rbl_config(), NUM_CLASSES).named_parameters() if p.requires_grad
    }
    assert ours_trainable == {k for k, p in reference.named_parameters() if p.requires_grad}


def test_strict_load_and_identical_outputs(reference: MaskRCNN, tmp_path) -> None:
    path = tmp_path / "maskrcnn.pth"
    torch.save(reference.state_dict(), path)
    ours = build_panet(rbl_config().override({"weights": str(path)}), NUM_CLASSES).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 200, 260, generator=g), torch.rand(3, 240, 180, generator=g)]
    with torch.no_grad():
        expected = reference(images)
        got = ours(images)
    assert sum(len(e["boxes"]) for e in expected) > 0, "the comparison needs detections"
    for e, o in zip(expected, got):
        assert set(o) == {"boxes", "labels", "scores", "masks"}
        for key in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(o[key], e[key], rtol=0, atol=0)


def test_train_losses_match(reference: MaskRCNN) -> None:
    ours = build_panet(rbl_config(), NUM_CLASSES)
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.rand(3, 160, 200, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 160, 200, dtype=torch.uint8)
    mask[0, 20:90, 30:120] = 1
    target = {
        "boxes": torch.tensor([[30.0, 20.0, 120.0, 90.0]]),
        "labels": torch.tensor([2]),
        "masks": mask,
    }
    losses = []
    for model in (reference, ours):
        model.train()
        torch.manual_seed(3)  # the RoI and anchor samplers draw random numbers
        losses.append(model([image], [target]))
        model.eval()
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key])
