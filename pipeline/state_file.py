"""`state.pt`, the one file of a checkpoint: written by training, read by training, evaluation
and prediction.

It holds the model, optimizer, scheduler and AMP scaler states, the step, RNG states, the
categories, the job's resolved config and the MLflow run id (`pipeline.train.loop`), and is
read back with `weights_only=True`: loading a checkpoint runs no code from it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from panet_model import PANetConfig
from panet_model.config import flatten
from pipeline.storage import StoragePath, as_path

STATE_FILE = "state.pt"


def save_state(directory: Path, **state: Any) -> Path:
    """Write `state` (tensors, state dicts, numbers, strings) to `directory/state.pt`."""
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written file under the real name
    return path


def load_state(path: str | Path | Any, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by `save_state`: a checkpoint directory or its `state.pt`.

    `mmap=True` maps the tensors instead of reading them (to inspect shapes cheaply).

    Raises:
        FileNotFoundError / ValueError: naming the path.
    """
    p = as_path(path)  # a local Path, or a StoragePath for s3:// / gs:// checkpoints
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        if isinstance(p, StoragePath):  # read into memory: torch.load needs a seekable file
            source: Any = io.BytesIO(p.read_bytes())
            mmap = False
        else:
            source = p
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"checkpoint {str(p)!r} cannot be read safely: {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {str(p)!r} is not a PANet training checkpoint")
    return state


def model_config(state: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    """The `PANetConfig` a checkpoint was trained with, with `{"model.dotted.key": value}`
    overrides, e.g. the test-time tricks `{"model.test.flip": True}` of `panet eval --set`.

    Raises:
        ValueError: naming an override that is not a `model.*` key or has a bad value.
    """
    plain = dict(state["config"]["model"])
    preset = plain.pop("preset", "tiny")
    updates = {}
    for key, value in (overrides or {}).items():
        if not key.startswith("model."):
            raise ValueError(f"--set {key}: only model.* keys apply to a trained model")
        updates[key[len("model.") :]] = value
    return PANetConfig.preset(preset).override(flatten(plain)).override(updates)
