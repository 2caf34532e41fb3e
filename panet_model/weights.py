"""Loading weights from a local path or `file://` URI: never from the network."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from torch import nn

# Tensors whose shape depends on the number of classes: skipped (with a warning) when
# fine-tuning a checkpoint on a data set with another number of classes.
CLASS_DEPENDENT = (
    "roi_heads.box_predictor.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)


def resolve_local(uri: str) -> Path:
    """A local path for `uri` (a path or a `file://` URI); raises naming the file otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "":
        path = Path(uri)
    else:
        raise ValueError(
            f"weights {uri!r}: only local paths and file:// URIs are loaded (nothing is "
            "downloaded); copy the file to local disk first"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    return path


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a state dict safely (`weights_only=True`), unwrapping `{"model": ...}` checkpoints."""
    path = resolve_local(uri)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(
            f"weights file {str(path)!r} is not a readable PyTorch checkpoint: {err}"
        ) from err
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    # DDP checkpoints prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def check_shapes(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str, target: str
) -> None:
    """Raise naming `source` and the first tensor whose shape differs from `own`'s."""
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"{source}: {len(mismatched)} tensors of the wrong shape, e.g. {k!r} is "
            f"{tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the {target}"
        )


def load_backbone_weights(trunk: nn.Module, uri: str) -> None:
    """Load ImageNet classification weights into a ResNet trunk (the classifier is ignored)."""
    state = {k: v for k, v in read_state_dict(uri).items() if not k.startswith("fc.")}
    check_shapes(
        state, trunk.state_dict(), f"backbone weights {uri!r}", "backbone (ImageNet: width 64)"
    )
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [
        k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {uri!r} do not fit the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def load_model_weights(model: nn.Module, uri: str) -> None:
    """Load a whole-model checkpoint; class-dependent predictor tensors of another shape are
    skipped with a warning, anything else that does not fit raises naming the keys."""
    state = read_state_dict(uri)
    own = model.state_dict()
    skipped = [
        k
        for k, v in state.items()
        if k in own and own[k].shape != v.shape and k.startswith(CLASS_DEPENDENT)
    ]
    for k in skipped:
        del state[k]
    check_shapes(state, own, f"weights {uri!r}", "model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"weights {uri!r} do not fit the model: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    if skipped:
        warnings.warn(
            f"weights {uri!r}: skipped class-dependent tensors of another shape: {skipped}",
            stacklevel=2,
        )
