"""Small building blocks shared by the neck and the heads."""

from __future__ import annotations

from torch import nn

from panet_model.norm import make_norm


def conv_norm_relu(
    in_channels: int,
    out_channels: int,
    norm: str,
    stride: int = 1,
    kernel_size: int = 3,
    dilation: int = 1,
) -> nn.Sequential:
    """Conv (bias only without a norm), optional norm, ReLU.

    The same module layout as torchvision's `Conv2dNormActivation`, so state-dict keys match
    torchvision's heads (`<i>.0.weight`, `<i>.1.weight` for the norm).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=norm == "none",
        )
    ]
    norm_layer = make_norm(norm, out_channels)
    if norm_layer is not None:
        layers.append(norm_layer)
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
