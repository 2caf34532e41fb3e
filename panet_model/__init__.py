"""PANet (Liu et al., CVPR 2018) as a pure PyTorch/torchvision library.

`from panet_model import PANetConfig, build_panet`; submodules load on first use, so
`import panet_model.norm` does not pull in the detection stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from panet_model.build import build_panet
    from panet_model.config import PANetConfig

__all__ = ["PANetConfig", "build_panet"]


def __getattr__(name: str) -> Any:
    if name == "PANetConfig":
        from panet_model.config import PANetConfig

        return PANetConfig
    if name == "build_panet":
        from panet_model.build import build_panet

        return build_panet
    raise AttributeError(f"module 'panet_model' has no attribute {name!r}")
