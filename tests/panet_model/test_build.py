"""Every preset and ablation switch builds, trains a step and evaluates; edge cases and bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from panet_model import PANetConfig, build_panet
from panet_model.bpa import BottomUpPath
from panet_model.model import check_inputs
from tests.panet_model.conftest import make_sample

NUM_CLASSES = 4

ABLATIONS = [
    {},
    {"afp.enabled": False},
    {"afp.fusion": "sum"},
    {"afp.position": "fu.fc1fc2"},
    {"afp.impl": "loop"},
    {"afp.enabled": False, "bpa.enabled": False},
    {"bpa.enabled": False},
    {"box_head.type": "2fc"},
    {"box_head.type": "2fc", "afp.position": "fu.fc1fc2"},
    {"box_head.class_agnostic": True},
    {"mask_head.ff.enabled": False},
    {"mask_head.ff.start": "conv2"},
    {"mask_head.ff.start": "conv4"},
    {"mask_head.ff.fusion": "max"},
    {"mask_head.ff.fusion": "product"},
    {"mask_head.ff.trailing_relu": False},
    {"mask_head.enabled": False},
    {
        "backbone.norm": "bn",
        "fpn.norm": "bn",
        "bpa.norm": "bn",
        "box_head.norm": "bn",
        "mask_head.norm": "bn",
    },
    {
        "backbone.norm": "gn",
        "fpn.norm": "gn",
        "bpa.norm": "gn",
        "box_head.norm": "gn",
        "mask_head.norm": "gn",
    },
    {
        "backbone.norm": "frozen_bn",
        "backbone.trainable_layers": 3,
        "fpn.norm": "none",
        "bpa.norm": "none",
        "box_head.norm": "none",
        "mask_head.norm": "none",
    },
    {"backbone.name": "resnet34"},
    {
        "rpn.anchor_sizes": [[8, 16], [32, 48], [64, 96], [128, 192], [256, 384]],
        "rpn.aspect_ratios": [0.2, 0.5, 1.0, 2.0, 5.0],
    },
]


def train_step_and_eval(model: torch.nn.Module, with_masks: bool = True) -> None:
    samples = [
        make_sample(120, 150, 3, NUM_CLASSES, seed=1),
        make_sample(140, 110, 2, NUM_CLASSES, seed=2),
    ]
    images = [s[0] for s in samples]
    targets = [
        s[1] if with_masks else {k: v for k, v in s[1].items() if k != "masks"} for s in samples
    ]
    model.train()
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if with_masks:
        expected.add("loss_mask")
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, img in zip(out, images):
        assert o["boxes"].shape[1] == 4 and o["boxes"].dtype == torch.float32
        if with_masks:
            assert o["masks"].shape[1:] == (1, *img.shape[1:])
        else:
            assert "masks" not in o


@pytest.mark.parametrize(
    "updates", ABLATIONS, ids=lambda u: ",".join(f"{k}={v}" for k, v in u.items()) or "tiny"
)
def test_ablation_switch_trains_and_evaluates(tiny_cfg: PANetConfig, updates: dict) -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg.override(updates)
    model = build_panet(cfg, NUM_CLASSES)
    train_step_and_eval(model, with_masks=cfg.mask_head.enabled)


@pytest.mark.parametrize("preset", ["rbl", "panet"])
def test_resnet50_presets_train_and_evaluate(preset: str) -> None:
    torch.manual_seed(0)
    cfg = PANetConfig.preset(preset).override(
        {"transform.min_size": (128,), "transform.max_size": 160, "roi.batch_size_per_image": 64}
    )
    train_step_and_eval(build_panet(cfg, NUM_CLASSES))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet101", "resnext101_32x8d", "resnext101_64x4d"])
def test_large_backbones_build_and_run(tiny_cfg: PANetConfig, name: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg.override({"backbone.name": name, "backbone.width": 64})  # the paper's trunks
    model = build_panet(cfg, NUM_CLASSES)
    train_step_and_eval(model)


def test_class_agnostic_box_regression(tiny_cfg: PANetConfig) -> None:
    torch.manual_seed(0)
    model = build_panet(tiny_cfg.override({"box_head.class_agnostic": True}), NUM_CLASSES)
    predictor = model.roi_heads.box_predictor
    assert predictor.bbox_pred.out_features == 4
    scores, deltas = predictor(torch.randn(5, predictor.cls_score.in_features))
    assert scores.shape == (5, NUM_CLASSES) and deltas.shape == (5, 4 * NUM_CLASSES)
    per_class = deltas.reshape(5, NUM_CLASSES, 4)  # every class gets the same deltas
    assert torch.equal(per_class, per_class[:, :1].expand_as(per_class))
    # Positives of every class train the one regressor.
    image, target = make_sample(120, 150, 4, NUM_CLASSES, seed=3)
    model.train()
    model([image], [target])["loss_box_reg"].backward()
    assert predictor.bbox_pred.weight.grad is not None
    assert predictor.bbox_pred.weight.grad.abs().sum() > 0
    default = build_panet(tiny_cfg, NUM_CLASSES).roi_heads.box_predictor
    assert default.bbox_pred.out_features == 4 * NUM_CLASSES


def test_images_without_annotations(tiny_cfg: PANetConfig) -> None:
    torch.manual_seed(0)
    model = build_panet(tiny_cfg, NUM_CLASSES).train()
    image, empty = make_sample(128, 128, 0, NUM_CLASSES)
    other, target = make_sample(128, 128, 2, NUM_CLASSES, seed=3)
    for batch in ([image], [image, other]):
        targets = [empty] if len(batch) == 1 else [empty, target]
        losses = model(batch, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        model.zero_grad()
    assert losses["loss_mask"].item() >= 0


def test_heads_with_zero_rois(tiny_cfg: PANetConfig) -> None:
    model = build_panet(tiny_cfg, NUM_CLASSES).train()
    heads = model.roi_heads
    c = tiny_cfg.fpn.out_channels
    box = heads.box_head(torch.zeros(4, 0, c, 7, 7))
    assert box.shape == (0, tiny_cfg.box_head.representation_size)
    cls, reg = heads.box_predictor(box)
    assert cls.shape == (0, NUM_CLASSES) and reg.shape == (0, 4 * NUM_CLASSES)
    logits = heads.mask_predictor(heads.mask_head(torch.zeros(4, 0, c, 14, 14)))
    assert logits.shape == (0, NUM_CLASSES, 28, 28)
    (box.sum() + logits.sum()).backward()
    # At inference no detection survives a score threshold of 1: empty masks, no crash.
    model = build_panet(tiny_cfg.override({"roi.score_thresh": 1.0}), NUM_CLASSES).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 120)])
    assert out[0]["boxes"].shape == (0, 4) and out[0]["masks"].shape == (0, 1, 100, 120)


def test_bpa_shapes_and_strides() -> None:
    bpa = BottomUpPath(16, 4, norm="none")
    p = [torch.rand(2, 16, 64 >> i, 80 >> i) for i in range(4)]
    n, names = bpa(p, [], ["0", "1", "2", "3"])
    assert names == ["0", "1", "2", "3", "pool"]
    assert [tuple(t.shape) for t in n] == [
        (2, 16, 64, 80),
        (2, 16, 32, 40),
        (2, 16, 16, 20),
        (2, 16, 8, 10),
        (2, 16, 4, 5),
    ]
    assert torch.equal(n[0], p[0])  # N2 is P2
    assert all(bool((t >= 0).all()) for t in n[1:])  # every conv is followed by a ReLU
    assert len(bpa.down) == 3 and len(bpa.fuse) == 3


def test_bpa_in_model_feeds_rpn_five_levels(tiny_cfg: PANetConfig) -> None:
    model = build_panet(tiny_cfg, NUM_CLASSES).eval()
    feats = model.backbone(torch.rand(1, 3, 128, 160))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [
        (32, 40),
        (16, 20),
        (8, 10),
        (4, 5),
        (2, 3),
    ]


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    cfg = PANetConfig.preset("tiny").override(
        {"transform.min_size": (96,), "transform.max_size": 128}
    )
    return build_panet(cfg, NUM_CLASSES).train()


def bad(mutate) -> tuple[list, list]:
    image, target = make_sample(64, 64, 2, NUM_CLASSES)
    images, targets = [image], [target]
    mutate(images, targets)
    return images, targets


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda i, t: t[0]["boxes"].__setitem__((1, 2), t[0]["boxes"][1, 0]),
            ValueError,
            r"target 0\['boxes'\]\[1\].*degenerate",
        ),
        (
            lambda i, t: i[0].__setitem__((0, 3, 4), float("nan")),
            ValueError,
            "image 0: contains NaN",
        ),
        (
            lambda i, t: i.__setitem__(0, (i[0] * 255).to(torch.uint8)),
            TypeError,
            "image 0: dtype torch.uint8",
        ),
        (
            lambda i, t: t[0].__setitem__("masks", t[0]["masks"][:, :32]),
            ValueError,
            r"target 0\['masks'\]: shape \(2, 32, 64\)",
        ),
        (
            lambda i, t: t[0].__setitem__("labels", t[0]["labels"].int()),
            TypeError,
            r"target 0\['labels'\]: dtype torch.int32",
        ),
        (
            lambda i, t: t[0].__setitem__("labels", torch.tensor([1, NUM_CLASSES])),
            ValueError,
            r"target 0\['labels'\]: values",
        ),
        (
            lambda i, t: t[0].__setitem__("boxes", t[0]["boxes"].long()),
            TypeError,
            r"target 0\['boxes'\]: dtype torch.int64",
        ),
        (lambda i, t: t[0].pop("masks"), ValueError, "target 0: missing key 'masks'"),
        (
            lambda i, t: i.__setitem__(0, i[0][:1]),
            ValueError,
            r"image 0: expected shape \(3, H, W\)",
        ),
        (lambda i, t: t.append(t[0]), ValueError, "1 images but 2 targets"),
        (lambda i, t: t[0]["boxes"].__setitem__((0, 0), float("inf")), ValueError, "NaN or inf"),
    ],
)
def test_bad_input_is_named(tiny_model, mutate, error, message) -> None:
    images, targets = bad(mutate)
    with pytest.raises(error, match=message):
        tiny_model(images, targets)


def test_weights_errors_name_the_file(tiny_cfg: PANetConfig, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_panet(tiny_cfg.override({"weights": str(tmp_path / "missing.pth")}), NUM_CLASSES)
    with pytest.raises(ValueError, match="only local paths"):
        build_panet(tiny_cfg.override({"weights": "https://example.com/w.pth"}), NUM_CLASSES)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_panet(tiny_cfg.override({"weights": str(junk)}), NUM_CLASSES)
    # A checkpoint of the other model does not fit: the error names the keys.
    other = build_panet(tiny_cfg.override({"afp.enabled": False}), NUM_CLASSES)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(ValueError, match="other.pth"):
        build_panet(tiny_cfg.override({"weights": str(path)}), NUM_CLASSES)


def test_finetune_from_other_class_count(tiny_cfg: PANetConfig, tmp_path) -> None:
    source = build_panet(tiny_cfg, 7)
    path = tmp_path / "source.pth"
    torch.save(source.state_dict(), path)
    with pytest.warns(UserWarning, match="class-dependent"):
        model = build_panet(tiny_cfg.override({"weights": f"file://{path}"}), NUM_CLASSES)
    torch.testing.assert_close(
        model.roi_heads.box_head.fc6.weight, source.roi_heads.box_head.fc6.weight
    )


def test_backbone_weights_from_local_file(tiny_cfg: PANetConfig, tmp_path) -> None:
    from torchvision.models import resnet18

    trunk = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(trunk.state_dict(), path)
    cfg = tiny_cfg.override({"backbone.weights": str(path), "backbone.width": 64})
    model = build_panet(cfg, NUM_CLASSES)
    torch.testing.assert_close(model.backbone.body.conv1.weight, trunk.conv1.weight)
    # The narrow trunk of the tiny preset cannot take them: the error names file and tensor.
    with pytest.raises(ValueError, match=r"resnet18\.pth.*'conv1\.weight' is \(64, 3, 7, 7\)"):
        build_panet(tiny_cfg.override({"backbone.weights": str(path)}), NUM_CLASSES)


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python: on a GPU each waits for all queued work."""

    READS = (Tensor.__bool__, Tensor.item, Tensor.tolist, Tensor.__int__, Tensor.__float__)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def batch_of(n: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    samples = [make_sample(64, 64, 3, NUM_CLASSES, seed=s) for s in range(n)]
    return [s[0] for s in samples], [s[1] for s in samples]


def test_input_checks_read_the_device_once_per_batch() -> None:
    """Finite pixels and boxes, box order and label range: one read for 4 images with targets."""
    images, targets = batch_of(4)
    with HostReads() as reads:
        check_inputs(images, targets, needs_masks=True, num_classes=NUM_CLASSES)
    assert reads.count == 1
    with HostReads() as reads:
        check_inputs(images, None, needs_masks=True, num_classes=NUM_CLASSES)
    assert reads.count == 1
    # A bad value in the last image is still found and named.
    targets[3]["boxes"][2, 3] = targets[3]["boxes"][2, 1]
    with pytest.raises(ValueError, match=r"target 3\['boxes'\]\[2\] = .* is degenerate"):
        check_inputs(images, targets, needs_masks=True, num_classes=NUM_CLASSES)
    images[2][1, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="image 2: contains NaN or inf"):
        check_inputs(images, targets, needs_masks=True, num_classes=NUM_CLASSES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_input_checks_sync_the_gpu_once_per_batch() -> None:
    images, targets = batch_of(4)
    images = [i.to("cuda:0") for i in images]
    targets = [{k: v.to("cuda:0") for k, v in t.items()} for t in targets]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            check_inputs(images, targets, needs_masks=True, num_classes=NUM_CLASSES)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in record if "synchroniz" in str(w.message)]) == 1
