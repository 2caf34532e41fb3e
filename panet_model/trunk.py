"""ResNet trunks: torchvision's at the paper's width, or the same blocks narrower for CPU presets."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models import resnet

# Blocks per stage (conv2_x..conv5_x) of the trunks that can be narrowed.
STAGES: dict[str, tuple[type[resnet.BasicBlock | resnet.Bottleneck], tuple[int, ...]]] = {
    "resnet18": (resnet.BasicBlock, (2, 2, 2, 2)),
    "resnet34": (resnet.BasicBlock, (3, 4, 6, 3)),
    "resnet50": (resnet.Bottleneck, (3, 4, 6, 3)),
    "resnet101": (resnet.Bottleneck, (3, 4, 23, 3)),
}
PAPER_WIDTH = 64  # stem channels of every ResNet / ResNeXt in the paper


def build_trunk(name: str, width: int, norm_layer: Callable[..., nn.Module]) -> nn.Module:
    """torchvision's `name` at `width == 64`; otherwise a `NarrowResNet` of the same depth."""
    if width == PAPER_WIDTH:
        return getattr(resnet, name)(weights=None, norm_layer=norm_layer)
    block, layers = STAGES[name]  # `PANetConfig.validate` allows narrowing only these
    return NarrowResNet(block, layers, width, norm_layer)


class NarrowResNet(nn.Module):
    """torchvision's ResNet layout and init with `width` stem channels (stages: w, 2w, 4w, 8w).

    Same module names (`conv1`, `bn1`, `layer1`..`layer4`) and `inplanes` as torchvision's
    `ResNet`, so stage freezing and the FPN's layer getter treat both alike; no classifier.
    """

    def __init__(
        self,
        block: type[resnet.BasicBlock | resnet.Bottleneck],
        layers: tuple[int, ...],
        width: int,
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, width, layers[0], 1, norm_layer)
        self.layer2 = self._make_stage(block, 2 * width, layers[1], 2, norm_layer)
        self.layer3 = self._make_stage(block, 4 * width, layers[2], 2, norm_layer)
        self.layer4 = self._make_stage(block, 8 * width, layers[3], 2, norm_layer)
        for m in self.modules():  # torchvision's init; norms start at weight 1, bias 0 already
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_stage(
        self,
        block: type[resnet.BasicBlock | resnet.Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        norm_layer: Callable[..., nn.Module],
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                resnet.conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, downsample, norm_layer=norm_layer)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> C5 features (N, 8 * width * expansion, H/32, W/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x
