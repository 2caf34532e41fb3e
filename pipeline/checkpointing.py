"""Training checkpoints: everything a killed job needs to go on where it stopped.

One file, `state.pt`, in a Ray Train checkpoint directory; read back with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def save_state(directory: Path, **state: Any) -> Path:
    """Write `state` (tensors, state dicts, numbers, strings) to `directory/state.pt`."""
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written file under the real name
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_state`: a checkpoint directory or its `state.pt`.

    Raises:
        FileNotFoundError / ValueError: naming the path.
    """
    p = Path(path)
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"checkpoint {str(p)!r} cannot be read safely: {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {str(p)!r} is not a PANet training checkpoint")
    return state


def rng_state() -> dict[str, Any]:
    """Torch RNG states (CPU and every CUDA device) as tensors, safe for weights_only."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
