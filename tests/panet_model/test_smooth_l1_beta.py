"""`box_head.smooth_l1_beta`: torchvision's 1/9 by default, Detectron's 1.0 on request."""

from __future__ import annotations

import pytest
import torch

from panet_model import PANetConfig, build_panet
from panet_model.heads import TORCHVISION_SMOOTH_L1_BETA, box_regression_loss

NUM_CLASSES = 3


def sample() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 128, 160, generator=g)
    masks = torch.zeros(2, 128, 160, dtype=torch.uint8)
    masks[0, 10:60, 20:90] = 1
    masks[1, 70:120, 100:150] = 1
    target = {
        "boxes": torch.tensor([[20.0, 10.0, 90.0, 60.0], [100.0, 70.0, 150.0, 120.0]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }
    return [image], [target]


def losses(beta: float | None, state: dict | None = None) -> tuple[dict, torch.nn.Module]:
    cfg = PANetConfig.preset("tiny").override({"transform.skip_resize_in_training": False})
    if beta is not None:
        cfg = cfg.override({"box_head.smooth_l1_beta": beta})
    torch.manual_seed(0)
    model = build_panet(cfg, NUM_CLASSES)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    images, targets = sample()
    torch.manual_seed(1)  # the anchor and RoI samplers draw random numbers
    return model(images, targets), model


def test_default_is_torchvision_beta() -> None:
    cfg = PANetConfig.preset("rbl")
    assert cfg.box_head.smooth_l1_beta == TORCHVISION_SMOOTH_L1_BETA == 1 / 9
    assert build_panet(cfg, NUM_CLASSES).roi_heads.smooth_l1_beta == 1 / 9


def test_own_loss_path_reproduces_torchvision_at_one_ninth() -> None:
    reference, model = losses(None)
    # A beta a hair off 1/9 takes the recomputing path; its loss must be torchvision's.
    model.roi_heads.smooth_l1_beta = 1 / 9 + 1e-12
    images, targets = sample()
    torch.manual_seed(1)
    again = model(images, targets)
    assert float(reference["loss_box_reg"].detach()) > 0
    torch.testing.assert_close(again["loss_box_reg"], reference["loss_box_reg"])
    torch.testing.assert_close(again["loss_classifier"], reference["loss_classifier"])


def test_beta_one_changes_only_the_box_loss() -> None:
    ninth, model = losses(None)
    one, _ = losses(1.0, model.state_dict())
    assert ninth.keys() == one.keys()
    for key in ninth:
        if key != "loss_box_reg":
            torch.testing.assert_close(one[key], ninth[key])
    # Smooth L1 does not grow with beta, and is strictly smaller for any nonzero residual.
    assert 0 < float(one["loss_box_reg"]) < float(ninth["loss_box_reg"])
    one["loss_box_reg"].backward()  # the recomputed loss is in the graph


def test_box_regression_loss_formula() -> None:
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(6, 4 * NUM_CLASSES, generator=g)
    labels = [torch.tensor([0, 1, 2]), torch.tensor([2, 0, 0])]
    targets = [torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)]
    beta = 0.5
    x = torch.stack(
        [
            deltas[1, 4:8] - targets[0][1],
            deltas[2, 8:12] - targets[0][2],
            deltas[3, 8:12] - targets[1][0],
        ]
    ).abs()
    expected = torch.where(x < beta, 0.5 * x**2 / beta, x - 0.5 * beta).sum() / 6
    torch.testing.assert_close(box_regression_loss(deltas, labels, targets, beta), expected)


def test_negative_beta_is_refused() -> None:
    with pytest.raises(ValueError, match="box_head.smooth_l1_beta"):
        PANetConfig.preset("rbl").override({"box_head.smooth_l1_beta": -1.0})
