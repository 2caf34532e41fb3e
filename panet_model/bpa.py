"""Bottom-up path augmentation (BPA), paper Sec. 3.1 and Fig. 2(b).

N2 = P2; N(i+1) = conv3x3(conv3x3_stride2(N(i)) + P(i+1)), 256 channels, every conv followed
by an optional norm and a ReLU. As in the authors' code the chain feeds the post-conv N(i)
upward, and the RPN's extra level is N6 = subsample(N5).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from panet_model.layers import conv_norm_relu


class BottomUpPath(ExtraFPNBlock):
    """Builds N2..N5 from the FPN's P2..P5 and appends N6 for the RPN.

    Plugs into torchvision's `FeaturePyramidNetwork` as its `extra_blocks`, so the RPN and
    the RoI poolers see [N2, N3, N4, N5, N6] under the FPN's names plus "pool".

    Args:
        channels: width of P(i) and N(i).
        num_levels: number of FPN levels it receives (4: P2..P5).
        norm: norm after each conv ("none", "bn", "syncbn", "gn").
    """

    def __init__(self, channels: int, num_levels: int = 4, norm: str = "none") -> None:
        super().__init__()
        self.down = nn.ModuleList(
            conv_norm_relu(channels, channels, norm, stride=2) for _ in range(num_levels - 1)
        )
        self.fuse = nn.ModuleList(
            conv_norm_relu(channels, channels, norm) for _ in range(num_levels - 1)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self, p: list[Tensor], c: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        """
        Args:
            p: [P2..P5], each (B, C, H_i, W_i) with H_(i+1) = ceil(H_i / 2).
            c: the backbone's C2..C5 (unused, part of torchvision's interface).
            names: the FPN level names.

        Returns:
            [N2..N5, N6] with the same shapes as [P2..P5, subsample(P5)], and names + ["pool"].
        """
        n = [p[0]]
        for i in range(1, len(p)):
            down = self.down[i - 1](n[-1])
            if down.shape[-2:] != p[i].shape[-2:]:
                raise ValueError(
                    f"BPA: stride-2 N{i + 1} has size {tuple(down.shape[-2:])} but P{i + 2} has "
                    f"{tuple(p[i].shape[-2:])}; pad images to a multiple of 32"
                )
            n.append(self.fuse[i - 1](down + p[i]))
        # N6 for the RPN only, as torchvision's LastLevelMaxPool does for P6.
        n.append(F.max_pool2d(n[-1], kernel_size=1, stride=2, padding=0))
        return n, [*names, "pool"]
