"""Adaptive feature pooling (AFP), paper Sec. 3.2 and Fig. 6.

Every proposal is pooled from every level (instead of the one level FPN assigns it), each
level passes through its own first parameter layer, and the levels are fused element-wise
(max or sum). The pooled tensor is level-major, (L, K, C, H, W), so each level's slice is
contiguous for its own layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from panet_model.norm import make_norm
from panet_model.roi_align import multilevel_roi_align


class LevelShareRecorder:
    """Counts, under max fusion, which level each fused element came from (paper Fig. 3).

    `counts[a, s]` is the number of fused elements whose maximum came from level `s`, over
    RoIs that FPN would have assigned to level `a`.
    """

    def __init__(self, num_levels: int) -> None:
        self.num_levels = num_levels
        self.counts = torch.zeros(num_levels, num_levels, dtype=torch.int64)
        self.assigned: Tensor | None = None

    def record(self, source_level: Tensor) -> None:
        """Args: source_level: (K, ...) argmax level of each fused element."""
        if self.assigned is None or source_level.numel() == 0:
            return
        num_levels = self.num_levels
        assigned = self.assigned.view(-1, *([1] * (source_level.dim() - 1))).expand_as(source_level)
        pairs = assigned.reshape(-1) * num_levels + source_level.reshape(-1)
        counts = torch.bincount(pairs.cpu(), minlength=num_levels * num_levels)
        self.counts += counts.view(num_levels, num_levels)

    def shares(self) -> Tensor:
        """(L, L) float: row a = share of fused elements taken from each level for RoIs of level a."""
        totals = self.counts.sum(dim=1, keepdim=True).clamp(min=1)
        return self.counts.double() / totals


class AdaptiveRoIPool(MultiScaleRoIAlign):
    """RoIAlign of every RoI on every level.

    Subclasses torchvision's pooler so `RoIHeads` treats it as one; the level scales are
    inferred on every call (torchvision caches them from the first batch).
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.recorder: LevelShareRecorder | None = None

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """
        Args:
            x: feature maps by name, each (B, C, H_l, W_l).
            boxes: per image (K_i, 4) boxes in image coordinates (x1, y1, x2, y2).
            image_shapes: per image (height, width) after the transform.

        Returns:
            (L, K, C, out_h, out_w) with K = sum K_i, level-major.
        """
        features = _filter_input(x, self.featmap_names)
        scales, mapper = _setup_scales(
            features, image_shapes, self.canonical_scale, self.canonical_level
        )
        rois = _convert_to_roi_format(boxes)  # (K, 5): batch index, x1, y1, x2, y2
        if self.recorder is not None:
            self.recorder.assigned = mapper(boxes) if rois.shape[0] else None
        return multilevel_roi_align(
            features, rois, self.output_size, scales, self.sampling_ratio
        )  # (L, K, C, h, w)


class LevelFusion(nn.Module):
    """Element-wise fusion over the level axis: max or sum.

    Args:
        op: "max" or "sum".
    """

    def __init__(self, op: str) -> None:
        super().__init__()
        if op not in ("max", "sum"):
            raise ValueError(f"AFP fusion must be 'max' or 'sum', got {op!r}")
        self.op = op
        self.recorder: LevelShareRecorder | None = None

    def forward(self, x: Tensor) -> Tensor:
        """(L, K, ...) -> (K, ...)."""
        if self.op == "sum":
            return x.sum(dim=0)
        if self.recorder is not None:
            values, source = x.max(dim=0)
            self.recorder.record(source)
            return values
        return x.amax(dim=0)


class LevelLinear(nn.Module):
    """One independent fully-connected layer per level (AFP's per-level fc1).

    Args:
        num_levels: L.
        in_features, out_features: as in `nn.Linear`.
        impl: "grouped" (one batched matmul over levels) or "loop" (one matmul per level).
    """

    def __init__(self, num_levels: int, in_features: int, out_features: int, impl: str) -> None:
        super().__init__()
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(num_levels, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_levels, out_features))
        # Each level initialised as its own nn.Linear would be.
        bound = 1.0 / math.sqrt(in_features)
        for level in range(num_levels):
            nn.init.kaiming_uniform_(self.weight[level], a=math.sqrt(5))
            nn.init.uniform_(self.bias[level], -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """(L, K, in) -> (L, K, out)."""
        if self.impl == "loop":
            return torch.stack(
                [F.linear(x[i], self.weight[i], self.bias[i]) for i in range(len(x))]
            )
        # (L, K, in) @ (L, in, out) + (L, 1, out) -> (L, K, out)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class LevelConv2d(nn.Module):
    """One independent 3x3 conv per level (AFP's per-level conv1 of the mask and HHD heads).

    The weight is stored in grouped-conv layout, (L * out, in, k, k), so "grouped" runs one
    convolution with `groups=L` and "loop" runs L convolutions on the level slices.

    Args:
        num_levels: L.
        in_channels, out_channels, kernel_size, dilation, bias: as in `nn.Conv2d`.
        impl: "grouped" or "loop".
    """

    def __init__(
        self,
        num_levels: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        bias: bool = True,
        impl: str = "grouped",
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.out_channels = out_channels
        self.padding = dilation * (kernel_size // 2)
        self.dilation = dilation
        self.impl = impl
        self.weight = nn.Parameter(
            torch.empty(num_levels * out_channels, in_channels, kernel_size, kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(num_levels * out_channels)) if bias else None
        # kaiming_normal_(fan_out, relu) per level, as torchvision's mask head convs.
        std = math.sqrt(2.0 / (out_channels * kernel_size * kernel_size))
        nn.init.normal_(self.weight, 0.0, std)

    def forward(self, x: Tensor) -> Tensor:
        """(L, K, C_in, H, W) -> (L, K, C_out, H, W)."""
        num_levels, k = x.shape[:2]
        if self.impl == "loop":
            weights = self.weight.view(num_levels, self.out_channels, *self.weight.shape[1:])
            biases = (
                self.bias.view(num_levels, -1) if self.bias is not None else [None] * num_levels
            )
            return torch.stack(
                [
                    F.conv2d(
                        x[i], weights[i], biases[i], padding=self.padding, dilation=self.dilation
                    )
                    for i in range(num_levels)
                ]
            )
        # (L, K, C, H, W) -> (K, L * C, H, W): levels become conv groups.
        grouped = x.transpose(0, 1).reshape(k, num_levels * x.shape[2], *x.shape[-2:])
        out = F.conv2d(
            grouped,
            self.weight,
            self.bias,
            padding=self.padding,
            dilation=self.dilation,
            groups=num_levels,
        )
        # (K, L * C_out, H, W) -> (L, K, C_out, H, W)
        return out.view(k, num_levels, self.out_channels, *out.shape[-2:]).transpose(0, 1)


class LevelNorm(nn.Module):
    """A norm with independent statistics and affine parameters per level.

    Folds the level axis into channels, (L, K, C, ...) -> (K, L * C, ...), so one BN/GN call
    normalises each level on its own (GN with L times the groups keeps groups within a level).

    Args:
        kind: "bn", "syncbn" or "gn".
        num_levels: L.
        channels: C per level.
        dim: 1 for (L, K, C) inputs after an fc, 2 for (L, K, C, H, W) after a conv.
    """

    def __init__(self, kind: str, num_levels: int, channels: int, dim: int) -> None:
        super().__init__()
        if kind == "gn":
            per_level = make_norm("gn", channels)
            assert isinstance(per_level, nn.GroupNorm)
            self.norm: nn.Module = nn.GroupNorm(
                per_level.num_groups * num_levels, channels * num_levels
            )
        else:
            norm = make_norm(kind, channels * num_levels, dim=dim)
            assert norm is not None
            self.norm = norm
        self.num_levels = num_levels

    def forward(self, x: Tensor) -> Tensor:
        """(L, K, C, ...) -> (L, K, C, ...)."""
        num_levels, k, c = x.shape[:3]
        rest = x.shape[3:]
        # (L, K, C, ...) -> (K, L * C, ...)
        folded = x.transpose(0, 1).reshape(k, num_levels * c, *rest)
        out = self.norm(folded)
        # (K, L * C, ...) -> (L, K, C, ...)
        return out.view(k, num_levels, c, *rest).transpose(0, 1)


def level_norm_or_none(kind: str, num_levels: int, channels: int, dim: int) -> nn.Module | None:
    """A `LevelNorm`, or None when `kind` is "none"."""
    return None if kind == "none" else LevelNorm(kind, num_levels, channels, dim)
