"""Training checkpoints: everything a killed job needs to go on where it stopped.

One file, `state.pt` (`pipeline.state_file`), and its seal in a Ray Train checkpoint
directory; here how it is uploaded (seal last, retried), what training restores from it (the
latest whole checkpoint that reads back) and what it checks before resuming.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch
from torch import nn

from panet_model.config import flatten
from pipeline import storage
from pipeline.state_file import SEAL_FILE, STATE_FILE, load_state, whole_checkpoints


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


def latest_state_file(run_dir: Any, warn: Callable[[str], None] = print) -> Any:
    """The `state.pt` of a job directory's newest whole checkpoint (local or a URI), or None.

    A `step-*` directory without its seal or with a file cut short is skipped, and `warn` is
    told which file and why. The sha256 is checked where the state is read (`load_state`).
    """
    found = whole_checkpoints(run_dir, warn)
    return found[-1] / STATE_FILE if found else None


def load_resume_state(
    location: str, warn: Callable[[str], None] = print, mmap: bool = False
) -> dict[str, Any]:
    """The state to resume from: checkpoint `location`'s, else the newest whole one before it.

    Ray Train hands a restarted or re-run job its latest reported checkpoint; one whose
    `state.pt` was cut or overwritten since is named in a warning, and the job goes on from the
    previous whole checkpoint of the same job directory.

    Raises:
        ValueError: naming the unreadable file, when no earlier checkpoint reads back either.
    """
    try:
        return load_state(location, mmap=mmap)
    except (ValueError, FileNotFoundError) as err:
        first = err
        warn(f"[train] warning: {err}")
    run_dir, newest = storage.parent(location), storage.name(location)
    for directory in reversed(whole_checkpoints(run_dir, warn)):
        if directory.name >= newest:
            continue
        try:
            state = load_state(directory, mmap=mmap)
        except (ValueError, FileNotFoundError) as err:
            warn(f"[train] warning: {err}")
            continue
        warn(f"[train] resuming from the previous whole checkpoint {directory}")
        return state
    raise ValueError(
        f"{first}; {run_dir!r} holds no earlier whole checkpoint: remove the job directory to "
        "start over, or train under a new name (--set name=...)"
    )


def location(fs: Any, path: str) -> str:
    """A pyarrow (filesystem, path) as the pipeline writes locations: a path or a URI."""
    kind = fs.type_name
    if kind == "local":
        return str(path)
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{path}"


def upload_files(local_dir: str | Path, fs: Any, path: str) -> None:
    """Copy a checkpoint directory's files to (fs, path), its seal last.

    Each file is written, closed and its size read back, retried while the storage's errors are
    transient (`storage.retrying`). On a failure the partial upload is removed; without its seal
    it is never listed anyway.

    Raises:
        OSError: naming the file's location (a full disk, or storage still unreachable).
    """
    names = sorted(f.name for f in Path(local_dir).iterdir() if f.is_file())
    names.sort(key=lambda n: n == SEAL_FILE)  # the seal last: its presence means "whole"
    try:
        storage.retrying(
            "creating", location(fs, path), functools.partial(fs.create_dir, path, recursive=True)
        )
        for name in names:
            target = f"{path}/{name}"
            try:
                storage.retrying(
                    "uploading",
                    location(fs, target),
                    functools.partial(_put, Path(local_dir, name), fs, target),
                )
            except OSError as err:
                if storage.is_disk_full(err):
                    raise storage.disk_full_error(location(fs, target)) from err
                raise
    except BaseException:
        with suppress(OSError):
            fs.delete_dir(path)
        raise


def _put(source: Path, fs: Any, target: str) -> None:
    """One file to (fs, target); an object that did not arrive whole raises (and is retried)."""
    with open(source, "rb") as f, fs.open_output_stream(target) as out:
        while block := f.read(8 << 20):
            out.write(block)
    size, got = source.stat().st_size, fs.get_file_info(target).size
    if got != size:
        raise OSError(f"{location(fs, target)!r}: {got} of {size} bytes arrived")


def free_name(fs: Any, parent: str, dir_name: str) -> str:
    """`dir_name`, or `<dir_name>-2`, `-3`, ... if a directory of that name exists under `parent`.

    After a resume from an earlier checkpoint (`load_resume_state`), the job reaches the steps of
    the unreadable checkpoints again; Ray Train still lists those, and deleting one of them
    (`keep_best`) must not take the new checkpoint with it.
    """
    name, n = dir_name, 1
    while fs.get_file_info(f"{parent}/{name}").type != pafs.FileType.NotFound:
        n += 1
        name = f"{dir_name}-{n}"
    return name


def upload_checkpoint(checkpoint: Any, dir_name: str) -> Any:
    """Ray Train's `checkpoint_upload_fn`: `upload_files` into the run's storage."""
    context = ray.train.get_context().get_storage()
    fs, root = context.storage_filesystem, context.experiment_fs_path
    path = f"{root}/{free_name(fs, root, dir_name)}"
    upload_files(checkpoint.path, fs, path)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def check_resumable(path: Path, model: nn.Module, model_config: dict[str, Any]) -> None:
    """Fail before training if the job's checkpoint `path` cannot load into `model`.

    Re-running a job name resumes it; after a change of the model's shape (a new preset
    version, another width) the checkpoint's tensors would not fit. Raises ValueError naming
    the job directory, the first differing tensor and the config keys that changed.
    """
    state = load_resume_state(str(path.parent), mmap=True)
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
