"""Deformable convolution in the ResNet trunk (paper Sec. 4.2, the COCO challenge entry).

`DeformConv` is `torchvision.ops.DeformConv2d` with its offset branch: a plain conv that
predicts 2 offsets per kernel tap and output position, initialised to zero, so a fresh
deformable layer computes exactly the convolution it replaces. It keeps that conv's parameter
names (`weight`, `bias`), so a plain trunk's weights load into it with only the offset branch
missing.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import DeformConv2d, deform_conv2d

# ResNet stage numbers (conv2_x..conv5_x, as the paper names them) -> torchvision module names.
STAGE_MODULES = {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}


class DeformConv(DeformConv2d):
    """A deformable 3x3 convolution whose offsets come from a zero-initialised conv of the input.

    Args: as `nn.Conv2d`; `offset_groups` channel groups share one offset field.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        offset_groups: int = 1,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        taps = kernel_size * kernel_size
        self.conv_offset = nn.Conv2d(
            in_channels,
            2 * offset_groups * taps,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        # Zero offsets: the layer starts as the plain convolution and learns to deform.
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> DeformConv:
        """A deformable twin of `conv`, with a copy of its weights."""
        dcn = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride[0],
            conv.padding[0],  # type: ignore[index]
            conv.dilation[0],
            conv.groups,
            bias=conv.bias is not None,
        )
        dcn.weight.data.copy_(conv.weight.data)
        if conv.bias is not None and dcn.bias is not None:
            dcn.bias.data.copy_(conv.bias.data)
        return dcn.to(conv.weight.device)

    def forward(self, x: Tensor, offset: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """(N, C_in, H, W) -> (N, C_out, H', W'); offsets (N, 2 * g * k * k, H', W') from the
        offset branch unless given."""
        if offset is None:
            offset = self.conv_offset(x)
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )


def make_deformable(trunk: nn.Module, stages: Iterable[int]) -> nn.Module:
    """Replace the 3x3 conv of every block in `stages` of a ResNet trunk by a `DeformConv`.

    The 3x3 conv is `conv2` of a Bottleneck (which carries the stride, ResNet v1.5) and of a
    BasicBlock (its second conv), as in Detectron's deformable ResNets.

    Args:
        trunk: torchvision ResNet/ResNeXt or `NarrowResNet` (modules `layer1`..`layer4`).
        stages: ResNet stage numbers in 2..5 (conv2_x..conv5_x).

    Returns:
        `trunk`, changed in place.
    """
    for stage in stages:
        layer = getattr(trunk, STAGE_MODULES[stage])
        for block in layer:
            if not isinstance(block, (resnet.Bottleneck, resnet.BasicBlock)):
                raise ValueError(f"stage {stage}: cannot make a {type(block).__name__} deformable")
            block.conv2 = DeformConv.from_conv(block.conv2)
    return trunk
