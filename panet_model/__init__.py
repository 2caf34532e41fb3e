"""PANet (Liu et al., CVPR 2018) as a pure PyTorch/torchvision library."""

from panet_model.config import PANetConfig
from panet_model.build import build_panet

__all__ = ["PANetConfig", "build_panet"]
