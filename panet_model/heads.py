"""Box and mask heads, with AFP's per-level first layer and the FF branch (paper Sec. 3.2-3.3).

Without AFP the heads take (K, C, H, W) from FPN's one-level pooling and match torchvision's
`TwoMLPHead`, `MaskRCNNHeads` and `MaskRCNNPredictor` parameter for parameter. With AFP they
take the level-major (L, K, C, H, W) from `AdaptiveRoIPool` and fuse the levels either before
their first parameter layer (`fu.fc1fc2`) or after it (`fc1fu.fc2`, per-level layers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads

from panet_model.afp import LevelConv2d, LevelFusion, LevelLinear, level_norm_or_none
from panet_model.boxes import Float32BoxCoder
from panet_model.layers import conv_norm_relu
from panet_model.norm import make_norm


class AFPSpec:
    """How a head receives pooled features.

    Args:
        num_levels: L levels pooled per RoI; 0 without AFP (one FPN-assigned level).
        fusion: "max" or "sum".
        position: "fc1fu.fc2" (per-level first layer, then fuse) or "fu.fc1fc2" (fuse first).
        impl: "grouped" or "loop" for the per-level layer.
    """

    def __init__(
        self,
        num_levels: int = 0,
        fusion: str = "max",
        position: str = "fc1fu.fc2",
        impl: str = "grouped",
    ) -> None:
        self.num_levels = num_levels
        self.fusion = fusion
        self.position = position
        self.impl = impl

    @property
    def per_level(self) -> bool:
        """True when the first parameter layer is replicated per level."""
        return self.num_levels > 0 and self.position == "fc1fu.fc2"

    @property
    def fuse_first(self) -> bool:
        """True when the levels are fused straight after pooling."""
        return self.num_levels > 0 and self.position == "fu.fc1fc2"

    def fusion_module(self) -> LevelFusion | None:
        return LevelFusion(self.fusion) if self.num_levels > 0 else None


class BoxHead2FC(nn.Module):
    """fc6 -> fc7 (the Mask R-CNN box head); fc6 is per level under AFP.

    Args:
        in_channels: C of the pooled features.
        pool_size: side of the pooled features.
        representation_size: fc width.
        norm: norm after each fc ("none" matches torchvision's `TwoMLPHead`).
        afp: how the pooled features arrive.
    """

    def __init__(
        self, in_channels: int, pool_size: int, representation_size: int, norm: str, afp: AFPSpec
    ) -> None:
        super().__init__()
        in_features = in_channels * pool_size * pool_size
        self.fuse_first = afp.fuse_first
        self.fusion = afp.fusion_module()
        if afp.per_level:
            self.fc6: nn.Module = LevelLinear(
                afp.num_levels, in_features, representation_size, afp.impl
            )
            self.norm6 = level_norm_or_none(norm, afp.num_levels, representation_size, dim=1)
        else:
            self.fc6 = nn.Linear(in_features, representation_size)
            self.norm6 = make_norm(norm, representation_size, dim=1)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.norm7 = make_norm(norm, representation_size, dim=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """(K, C, h, w) or (L, K, C, h, w) -> (K, representation_size)."""
        if self.fusion is not None and self.fuse_first:
            x = self.fusion(x)  # (L, K, C, h, w) -> (K, C, h, w)
        if self.fusion is not None and not self.fuse_first:
            x = self.fc6(x.flatten(2))  # (L, K, C, h, w) -> (L, K, C*h*w) -> (L, K, R)
            x = self.relu(self.norm6(x) if self.norm6 is not None else x)
            x = self.fusion(x)  # (L, K, R) -> (K, R)
        else:
            x = self.fc6(x.flatten(1))  # (K, C, h, w) -> (K, C*h*w) -> (K, R)
            x = self.relu(self.norm6(x) if self.norm6 is not None else x)
        x = self.fc7(x)
        return self.relu(self.norm7(x) if self.norm7 is not None else x)


class BoxHead4Conv1FC(nn.Module):
    """The heavier box head (HHD): 4 convs shared by classification and regression, then an fc.

    As in the authors' code, the first conv is per level under AFP, the levels are fused after
    it, and the remaining convs and the fc are shared.

    Args:
        in_channels: C of the pooled features.
        pool_size: side of the pooled features.
        conv_channels: conv width.
        num_convs: number of 3x3 convs.
        representation_size: fc width.
        norm: norm after each conv and the fc.
        afp: how the pooled features arrive.
    """

    def __init__(
        self,
        in_channels: int,
        pool_size: int,
        conv_channels: int,
        num_convs: int,
        representation_size: int,
        norm: str,
        afp: AFPSpec,
    ) -> None:
        super().__init__()
        self.fuse_first = afp.fuse_first
        self.fusion = afp.fusion_module()
        if afp.per_level:
            first = LevelConv2d(
                afp.num_levels, in_channels, conv_channels, bias=norm == "none", impl=afp.impl
            )
            first_norm = level_norm_or_none(norm, afp.num_levels, conv_channels, dim=2)
            self.conv1 = nn.Sequential(
                *[m for m in (first, first_norm) if m is not None], nn.ReLU(inplace=True)
            )
        else:
            self.conv1 = conv_norm_relu(in_channels, conv_channels, norm)
        self.convs = nn.Sequential(
            *[conv_norm_relu(conv_channels, conv_channels, norm) for _ in range(num_convs - 1)]
        )
        self.fc6 = nn.Linear(conv_channels * pool_size * pool_size, representation_size)
        self.norm6 = make_norm(norm, representation_size, dim=1)
        self.relu = nn.ReLU(inplace=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(K, C, h, w) or (L, K, C, h, w) -> (K, representation_size)."""
        if self.fusion is not None and self.fuse_first:
            x = self.fusion(x)  # (L, K, C, h, w) -> (K, C, h, w)
        x = self.conv1(x)
        if self.fusion is not None and not self.fuse_first:
            x = self.fusion(x)  # (L, K, C', h, w) -> (K, C', h, w)
        x = self.convs(x)
        x = self.fc6(x.flatten(1))  # (K, C', h, w) -> (K, C'*h*w) -> (K, R)
        return self.relu(self.norm6(x) if self.norm6 is not None else x)


class BoxPredictor(FastRCNNPredictor):
    """torchvision's class scores and per-class box deltas, or one class-agnostic regressor.

    Class-agnostic (Detectron's `CLS_AGNOSTIC_BBOX_REG`): a single (dx, dy, dw, dh) output
    trained by every positive RoI, whatever its class, and repeated for each class so that
    torchvision's loss and post-processing see the per-class layout.
    """

    def __init__(self, in_channels: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__(in_channels, num_classes)
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        if class_agnostic:
            self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = super().forward(x)
        if self.class_agnostic:
            deltas = deltas.repeat(1, self.num_classes)  # (K, 4) -> (K, 4 * num_classes)
        return scores, deltas


class FullyConnectedFusion(nn.Module):
    """The FF branch: two 3x3 convs (the second halves the channels) and one fc to M*M logits.

    Args:
        channels: C of the FCN layer the branch starts from.
        pool_size: side of the mask head's features (14); masks are M = 2 * pool_size.
        norm: norm after each conv.
        trailing_relu: ReLU after the fc (the authors' code has it, the paper does not).
    """

    def __init__(self, channels: int, pool_size: int, norm: str, trailing_relu: bool) -> None:
        super().__init__()
        self.mask_size = 2 * pool_size
        self.conv4_fc = conv_norm_relu(channels, channels, norm)
        self.conv5_fc = conv_norm_relu(channels, channels // 2, norm)
        self.fc = nn.Linear((channels // 2) * pool_size * pool_size, self.mask_size**2)
        self.trailing_relu = trailing_relu
        for m in (self.conv4_fc[0], self.conv5_fc[0]):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(K, C, h, w) -> (K, 1, M, M) class-agnostic foreground logits."""
        x = self.conv5_fc(self.conv4_fc(x))
        x = self.fc(x.flatten(1))  # (K, C/2, h, w) -> (K, C/2*h*w) -> (K, M*M)
        if self.trailing_relu:
            x = torch.relu(x)
        return x.view(-1, 1, self.mask_size, self.mask_size)  # (K, M*M) -> (K, 1, M, M)


class MaskHead(nn.Module):
    """The mask FCN: `num_convs` 3x3 convs, the first per level under AFP, plus the FF branch.

    Conv blocks are registered as "0".."n-1" so that, without AFP and FF, the state dict is
    torchvision's `MaskRCNNHeads`.

    Args:
        in_channels: C of the pooled features.
        channels: conv width.
        num_convs: number of convs.
        dilation: conv dilation.
        norm: norm after each conv.
        afp: how the pooled features arrive.
        ff: the FF branch, or None.
        ff_start: the conv (1-based) whose output feeds the FF branch.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_convs: int,
        dilation: int,
        norm: str,
        afp: AFPSpec,
        ff: FullyConnectedFusion | None = None,
        ff_start: int = 3,
    ) -> None:
        super().__init__()
        self.fuse_first = afp.fuse_first
        self.fusion = afp.fusion_module()
        self.num_convs = num_convs
        for i in range(num_convs):
            c_in = in_channels if i == 0 else channels
            if i == 0 and afp.per_level:
                conv = LevelConv2d(
                    afp.num_levels,
                    c_in,
                    channels,
                    dilation=dilation,
                    bias=norm == "none",
                    impl=afp.impl,
                )
                level_norm = level_norm_or_none(norm, afp.num_levels, channels, dim=2)
                block = nn.Sequential(
                    *[m for m in (conv, level_norm) if m is not None], nn.ReLU(inplace=True)
                )
            else:
                block = conv_norm_relu(c_in, channels, norm, dilation=dilation)
                nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
                if block[0].bias is not None:
                    nn.init.zeros_(block[0].bias)
            self.add_module(str(i), block)
        self.ff = ff
        self.ff_start = ff_start

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """(K, C, h, w) or (L, K, C, h, w) -> (K, channels, h, w), plus (K, 1, 2h, 2w) FF logits."""
        if self.fusion is not None and self.fuse_first:
            x = self.fusion(x)  # (L, K, C, h, w) -> (K, C, h, w)
        ff_input = x
        for i in range(self.num_convs):
            x = getattr(self, str(i))(x)
            if i == 0 and self.fusion is not None and not self.fuse_first:
                x = self.fusion(x)  # (L, K, C', h, w) -> (K, C', h, w)
            if i + 1 == self.ff_start:
                ff_input = x
        if self.ff is None:
            return x
        return x, self.ff(ff_input)


class MaskPredictor(MaskRCNNPredictor):
    """torchvision's deconv + per-class 1x1 predictor, fusing the FF branch's logits.

    Args:
        in_channels, dim_reduced, num_classes: as `MaskRCNNPredictor`.
        ff_fusion: "sum", "max" or "product" of the per-class FCN logits and the FF logits.
    """

    def __init__(
        self, in_channels: int, dim_reduced: int, num_classes: int, ff_fusion: str = "sum"
    ) -> None:
        super().__init__(in_channels, dim_reduced, num_classes)
        if ff_fusion not in ("sum", "max", "product"):
            raise ValueError(f"FF fusion must be sum, max or product, got {ff_fusion!r}")
        self.ff_fusion = ff_fusion

    def forward(self, x: Tensor | tuple[Tensor, Tensor]) -> Tensor:  # type: ignore[override]
        """(K, C, h, w) [, (K, 1, 2h, 2w)] -> (K, num_classes, 2h, 2w) mask logits."""
        if not isinstance(x, tuple):
            return super().forward(x)
        fcn, ff = x
        logits = super().forward(fcn)
        # (K, 1, M, M) broadcasts over the classes: the fc branch is class-agnostic.
        if self.ff_fusion == "sum":
            return logits + ff
        if self.ff_fusion == "max":
            return torch.maximum(logits, ff)
        return logits * ff


TORCHVISION_SMOOTH_L1_BETA = 1 / 9  # torchvision's `fastrcnn_loss`, fixed there


def box_regression_loss(
    box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor], beta: float
) -> Tensor:
    """Fast R-CNN's box loss with a chosen smooth-L1 `beta` (torchvision's is fixed at 1/9).

    Args:
        box_regression: (K, 4 * num_classes) predicted deltas of the K sampled RoIs.
        labels: per image (k_i,) sampled labels, 0 = background.
        regression_targets: per image (k_i, 4) target deltas.
        beta: smooth-L1 switch point; 0 is L1.

    Returns:
        The summed loss of the positive RoIs over the number of sampled RoIs, as torchvision.
    """
    labels_all = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    positive = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)  # (K, 4C) -> (K, C, 4)
    loss = nn.functional.smooth_l1_loss(
        deltas[positive, labels_all[positive]], targets[positive], beta=beta, reduction="sum"
    )
    return loss / labels_all.numel()


class PANetRoIHeads(RoIHeads):
    """torchvision's `RoIHeads` whose box loss takes the smooth-L1 `beta` as an argument.

    At torchvision's 1/9 it is torchvision's code path unchanged. Otherwise the sampled labels
    and targets and the predictor's deltas of the same forward give the box loss again with
    `beta` (torchvision's 1/9 loss is computed too, and left out of the graph's sum).
    """

    def __init__(self, *args: Any, smooth_l1_beta: float = TORCHVISION_SMOOTH_L1_BETA, **kw: Any):
        super().__init__(*args, **kw)
        self.box_coder = Float32BoxCoder(self.box_coder.weights)  # float32 boxes under AMP
        self.smooth_l1_beta = smooth_l1_beta
        self._sampled: tuple[list[Tensor], list[Tensor]] | None = None

    def select_training_samples(self, proposals: Any, targets: Any) -> Any:
        out = super().select_training_samples(proposals, targets)
        self._sampled = (out[2], out[3])  # labels, regression_targets
        return out

    def forward(self, features: Any, proposals: Any, image_shapes: Any, targets: Any = None) -> Any:
        if not self.training or self.smooth_l1_beta == TORCHVISION_SMOOTH_L1_BETA:
            return super().forward(features, proposals, image_shapes, targets)
        seen: dict[str, Tensor] = {}

        def keep(module: nn.Module, inputs: Any, output: tuple[Tensor, Tensor]) -> None:
            seen["deltas"] = output[1]

        hook = self.box_predictor.register_forward_hook(keep)
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        assert self._sampled is not None
        labels, regression_targets = self._sampled
        self._sampled = None
        losses["loss_box_reg"] = box_regression_loss(
            seen["deltas"], labels, regression_targets, self.smooth_l1_beta
        )
        return result, losses
