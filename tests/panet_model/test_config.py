"""Config presets, dotted overrides and their error messages."""

from __future__ import annotations

import pytest

from panet_model import PANetConfig


@pytest.mark.parametrize("name", ["rbl", "panet", "tiny"])
def test_presets_validate_and_round_trip(name: str) -> None:
    cfg = PANetConfig.preset(name)
    assert PANetConfig.from_dict(cfg.to_dict()) == cfg
    assert all("." in k or k == "weights" for k in cfg.flat())


def test_panet_preset_turns_on_every_paper_component() -> None:
    cfg = PANetConfig.preset("panet")
    assert cfg.bpa.enabled and cfg.afp.enabled and cfg.mask_head.ff.enabled
    assert cfg.box_head.type == "4conv1fc"
    assert cfg.backbone.norm == "syncbn"
    rbl = PANetConfig.preset("rbl")
    assert not (rbl.bpa.enabled or rbl.afp.enabled or rbl.mask_head.ff.enabled)
    assert rbl.box_head.type == "2fc" and rbl.backbone.norm == "frozen_bn"


def test_override_coerces_lists_and_numbers() -> None:
    cfg = PANetConfig.preset("rbl").override(
        {"transform.min_size": [640, 800], "roi.nms_thresh": 1, "afp.fusion": "sum"}
    )
    assert cfg.transform.min_size == (640, 800)
    assert cfg.roi.nms_thresh == 1.0 and isinstance(cfg.roi.nms_thresh, float)
    assert cfg.afp.fusion == "sum"


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"afp.fuson": "max"}, "afp.fuson"),
        ({"nope": 1}, "nope"),
        ({"afp": 1}, "afp"),
        ({"afp.fusion": "min"}, "afp.fusion"),
        ({"afp.enabled": "yes"}, "afp.enabled"),
        ({"roi.batch_size_per_image": 1.5}, "roi.batch_size_per_image"),
        ({"roi.batch_size_per_image": 0}, "roi.batch_size_per_image"),
        ({"backbone.name": "vgg16"}, "backbone.name"),
        ({"backbone.trainable_layers": 7}, "backbone.trainable_layers"),
        ({"rpn.anchor_sizes": [[32], [64, 96], [128], [256], [512]]}, "rpn.anchor_sizes"),
        ({"rpn.anchor_sizes": [[32]]}, "rpn.anchor_sizes"),
        ({"mask_head.num_convs": 2, "mask_head.ff.start": "conv3"}, "mask_head.ff.start"),
        ({"transform.image_mean": [0.5, 0.5]}, "transform.image_mean"),
    ],
)
def test_bad_override_names_the_key(updates: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        PANetConfig.preset("tiny").override(updates)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        PANetConfig.preset("nope")


def test_config_is_frozen() -> None:
    cfg = PANetConfig.preset("tiny")
    with pytest.raises(AttributeError):
        cfg.afp.enabled = False  # type: ignore[misc]
