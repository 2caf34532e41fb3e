"""Training checkpoints: everything a killed job needs to go on where it stopped.

One file, `state.pt` (`pipeline.state_file`), in a Ray Train checkpoint directory; here what
training restores from it and what it checks before resuming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from panet_model.config import flatten
from pipeline.state_file import STATE_FILE, load_state
from pipeline.storage import as_path


def rng_state() -> dict[str, Any]:
    """Torch RNG states, safe for weights_only: the CPU's and, on a GPU, the current device's.

    Only this rank's own device: a resumed job may pack its workers onto other GPUs (or see
    another number of them), and each rank restores into whatever device is its own then.
    """
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s states; a CUDA state goes to this process's current device."""
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load a `save_state` checkpoint into a model already on its training device.

    The optimizer must have been built over the parameters on that device: its
    `load_state_dict` moves every state tensor (momentum, `exp_avg`, ...) to its parameter's
    device and dtype, which a later `model.to(device)` would not. A scaler state saved without
    fp16 AMP (`{}`) leaves an enabled scaler at its initial scale, and the other way round.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def latest_state_file(run_dir: Any) -> Any:
    """The newest `step-*/state.pt` of a job directory (local or a URI), or None."""
    files = sorted(as_path(run_dir).glob(f"step-*/{STATE_FILE}"))
    return files[-1] if files else None


def check_resumable(path: Path, model: nn.Module, model_config: dict[str, Any]) -> None:
    """Fail before training if the job's checkpoint `path` cannot load into `model`.

    Re-running a job name resumes it; after a change of the model's shape (a new preset
    version, another width) the checkpoint's tensors would not fit. Raises ValueError naming
    the job directory, the first differing tensor and the config keys that changed.
    """
    state = load_state(path, mmap=True)
    saved, own = state.get("model", {}), model.state_dict()
    differs = sorted(
        k
        for k in saved.keys() | own.keys()
        if k not in saved or k not in own or saved[k].shape != own[k].shape
    )
    if not differs:
        return
    old = flatten(state.get("config", {}).get("model", {}))
    new = flatten(model_config)
    changed = [
        f"model.{k} {old.get(k, 'unset')} -> {new.get(k, 'unset')}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    raise ValueError(
        f"job directory {str(path.parent.parent)!r} holds {path.parent.name} of another model or class count "
        f"({len(differs)} tensors differ, e.g. {differs[0]!r}; changed: "
        f"{', '.join(changed[:6]) or 'no config key'}): re-running a job name resumes it, so "
        "train under a new name (--set name=...) or remove that directory to start over"
    )
