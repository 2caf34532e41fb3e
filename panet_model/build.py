"""`build_panet`: the only place that reads a `PANetConfig`.

Each ablation switch travels one step from here into a module argument.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from panet_model.afp import AdaptiveRoIPool
from panet_model.boxes import Float32AnchorGenerator, PANetRPN
from panet_model.bpa import BottomUpPath
from panet_model.config import PANetConfig
from panet_model.dcn import make_deformable
from panet_model.frozen_bn import FrozenBatchNorm2d
from panet_model.heads import (
    AFPSpec,
    BoxHead2FC,
    BoxHead4Conv1FC,
    BoxPredictor,
    FullyConnectedFusion,
    MaskHead,
    MaskPredictor,
    PANetRoIHeads,
)
from panet_model.model import PANet
from panet_model.norm import SyncBatchNorm, make_norm
from panet_model.trunk import build_trunk
from panet_model.weights import load_backbone_weights, load_model_weights

FEATURE_NAMES = ["0", "1", "2", "3"]  # P2..P5 (or N2..N5 with BPA); "pool" is P6/N6


def build_panet(cfg: PANetConfig, num_classes: int) -> PANet:
    """Build PANet (or, with the `rbl` preset, Mask R-CNN) from a configuration.

    Args:
        cfg: a validated configuration.
        num_classes: number of classes including the background (COCO: 91 ids, 81 classes).

    Returns:
        A `PANet` module with torchvision's detection calling convention.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must count the background and >= 1 class, got {num_classes}")
    backbone = build_backbone(cfg)
    rpn = build_rpn(cfg, backbone.out_channels)
    roi_heads = build_roi_heads(cfg, backbone.out_channels, num_classes)
    t = cfg.transform
    transform = GeneralizedRCNNTransform(
        min_size=t.min_size,
        max_size=t.max_size,
        image_mean=list(t.image_mean),
        image_std=list(t.image_std),
        _skip_resize=t.skip_resize_in_training,
    )
    model = PANet(backbone, rpn, roi_heads, transform)
    model.test = cfg.test
    if cfg.weights:
        load_model_weights(model, cfg.weights)
    return model


def backbone_norm_layer(kind: str, frozen_eps: float) -> type[nn.Module] | partial[nn.Module]:
    """The `norm_layer` callable torchvision's ResNet takes for `backbone.norm`."""
    if kind == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=frozen_eps)
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "syncbn":
        return SyncBatchNorm
    if kind == "gn":
        return partial(make_norm, "gn")  # type: ignore[return-value]
    raise ValueError(f"config key 'backbone.norm': unknown norm {kind!r}")


def build_backbone(cfg: PANetConfig) -> BackboneWithFPN:
    """ResNet/ResNeXt + FPN (+ BPA as the FPN's extra block, which also makes N6)."""
    b = cfg.backbone
    trunk = build_trunk(b.name, b.width, backbone_norm_layer(b.norm, b.frozen_bn_eps))
    if b.weights:
        load_backbone_weights(trunk, b.weights)
    if b.dcn_stages:
        make_deformable(trunk, b.dcn_stages)  # after the ImageNet weights: it copies them
    extra = (
        BottomUpPath(cfg.fpn.out_channels, len(FEATURE_NAMES), cfg.bpa.norm)
        if cfg.bpa.enabled
        else LastLevelMaxPool()
    )
    freeze_stages(trunk, b.trainable_layers)
    fpn_norm = None if cfg.fpn.norm == "none" else partial(make_norm, cfg.fpn.norm)
    c2 = trunk.inplanes // 8  # C2 width: 64 (BasicBlock) or 256 (Bottleneck)
    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
        in_channels_list=[c2, 2 * c2, 4 * c2, 8 * c2],
        out_channels=cfg.fpn.out_channels,
        extra_blocks=extra,
        norm_layer=fpn_norm,  # type: ignore[arg-type]
    )


def freeze_stages(trunk: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top `trainable_layers` stages, exactly as torchvision does."""
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in trunk.named_parameters():
        if not name.startswith(tuple(layers_to_train)):
            parameter.requires_grad_(False)


def build_rpn(cfg: PANetConfig, channels: int) -> PANetRPN:
    r = cfg.rpn
    anchors = Float32AnchorGenerator(r.anchor_sizes, (r.aspect_ratios,) * len(r.anchor_sizes))
    head = RPNHead(channels, anchors.num_anchors_per_location()[0])
    return PANetRPN(
        anchors,
        head,
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
        score_thresh=r.score_thresh,
    )


def build_pooler(cfg: PANetConfig, size: int) -> MultiScaleRoIAlign:
    """AFP's all-level pooler, or FPN's one-level pooler."""
    cls = AdaptiveRoIPool if cfg.afp.enabled else MultiScaleRoIAlign
    return cls(
        FEATURE_NAMES,
        size,
        cfg.roi.sampling_ratio,
        canonical_scale=cfg.roi.canonical_scale,
        canonical_level=cfg.roi.canonical_level,
    )


def build_roi_heads(cfg: PANetConfig, channels: int, num_classes: int) -> PANetRoIHeads:
    a, bh, mh = cfg.afp, cfg.box_head, cfg.mask_head
    afp = AFPSpec(len(FEATURE_NAMES) if a.enabled else 0, a.fusion, a.position, a.impl)
    box_head: nn.Module
    if bh.type == "2fc":
        box_head = BoxHead2FC(channels, bh.pool_size, bh.representation_size, bh.norm, afp)
    else:
        box_head = BoxHead4Conv1FC(
            channels,
            bh.pool_size,
            bh.conv_channels,
            bh.num_convs,
            bh.representation_size,
            bh.norm,
            afp,
        )
    mask_pool = mask_head = mask_predictor = None
    if mh.enabled:
        ff = None
        if mh.ff.enabled:
            ff = FullyConnectedFusion(mh.channels, mh.pool_size, mh.norm, mh.ff.trailing_relu)
        mask_pool = build_pooler(cfg, mh.pool_size)
        mask_head = MaskHead(
            channels,
            mh.channels,
            mh.num_convs,
            mh.dilation,
            mh.norm,
            afp,
            ff=ff,
            ff_start=int(mh.ff.start[-1]),
        )
        mask_predictor = MaskPredictor(mh.channels, mh.channels, num_classes, mh.ff.fusion)
    r = cfg.roi
    return PANetRoIHeads(
        build_pooler(cfg, bh.pool_size),
        box_head,
        BoxPredictor(bh.representation_size, num_classes, bh.class_agnostic),
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        bbox_reg_weights=None,
        score_thresh=r.score_thresh,
        nms_thresh=r.nms_thresh,
        detections_per_img=r.detections_per_img,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
        smooth_l1_beta=bh.smooth_l1_beta,
    )
