"""Frozen batch norm that keeps the activations' dtype under AMP."""

from __future__ import annotations

from torch import Tensor
from torchvision import ops


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's `FrozenBatchNorm2d` whose output has the input's dtype.

    torchvision's multiplies the input by a float32 scale, which promotes bfloat16/float16
    activations to float32 after every frozen norm of the trunk: twice the memory and bandwidth
    until the next conv casts them back. Here the per-channel scale and bias are computed in the
    buffers' dtype, then cast to the input's; on float32 input the result is torchvision's bit
    for bit. Same buffers and state-dict keys as torchvision's.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W) in `x`'s dtype."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        # (C,) -> (1, C, 1, 1)
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)
