"""`state.pt`, the one file of a checkpoint: written by training, read by training, evaluation
and prediction.

It holds the model, optimizer, scheduler and AMP scaler states, the step, RNG states, the
categories, the job's resolved config and the MLflow run id (`pipeline.train.loop`), and is
read back with `weights_only=True`: loading a checkpoint runs no code from it.

A checkpoint is whole when its `checkpoint.json` (the seal: each file's size and sha256,
uploaded last) is there and every file has its size; `whole_checkpoints` lists only those, and
`load_state` checks `state.pt`'s sha256 against the seal.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from panet_model import PANetConfig
from panet_model.config import flatten
from pipeline import storage
from pipeline.storage import StoragePath, as_path

STATE_FILE = "state.pt"
SEAL_FILE = "checkpoint.json"  # written last: {"files": {name: {"bytes", "sha256"}}}


def save_state(directory: Path, **state: Any) -> Path:
    """Write `state` (tensors, state dicts, numbers, strings) to `directory/state.pt`, then seal
    the directory (`seal`: every file written before it counts as part of the checkpoint)."""
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    try:
        # Through a Python file: a failed write then carries its OSError (errno) along.
        with open(tmp, "wb") as f:
            torch.save(state, f)
        tmp.replace(path)  # never a half-written file under the real name
    except (OSError, RuntimeError) as err:  # torch.save wraps a failed write in RuntimeError
        tmp.unlink(missing_ok=True)
        if storage.is_disk_full(err) or storage.is_disk_full(err.__context__ or err):
            raise storage.disk_full_error(path) from err
        raise
    seal(directory)
    return path


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def seal(directory: Path) -> dict[str, Any]:
    """Write `directory/checkpoint.json`: the size and sha256 of each of its files."""
    files = {
        f.name: _digest(f)
        for f in sorted(Path(directory).iterdir())
        if f.is_file() and f.name != SEAL_FILE and not f.name.startswith(".")
    }
    record = {"files": files}
    storage.write_text(Path(directory) / SEAL_FILE, json.dumps(record, indent=1))
    return record


def read_seal(checkpoint_dir: Any) -> dict[str, Any] | None:
    """A checkpoint directory's seal, or None if it has none (or an unreadable one)."""
    try:
        record = json.loads((as_path(checkpoint_dir) / SEAL_FILE).read_text())
        return record if isinstance(record.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def not_whole(checkpoint_dir: Any) -> str:
    """Why a checkpoint directory is not whole ("" if it is): no seal, a file missing or cut."""
    record = read_seal(checkpoint_dir)
    if record is None:
        return f"{str(checkpoint_dir)!r} has no {SEAL_FILE} (written last): incomplete"
    fs, root = storage.filesystem(str(checkpoint_dir))
    sizes = {
        i.base_name: i.size
        for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        if i.type == pafs.FileType.File
    }
    for name, entry in record["files"].items():
        if sizes.get(name) != entry.get("bytes"):
            have = "missing" if name not in sizes else f"{sizes[name]} bytes"
            return (
                f"{str(as_path(checkpoint_dir) / name)!r} is {have}, {SEAL_FILE} says "
                f"{entry.get('bytes')} bytes: incomplete or corrupt"
            )
    return ""


def whole_checkpoints(run_dir: Any, warn: Callable[[str], None] | None = None) -> list[Any]:
    """A job directory's whole `step-*` checkpoint directories, oldest first.

    Args:
        run_dir: a local path or a URI.
        warn: told why each `step-*` directory that is not whole is left out.
    """
    found = []
    for entry in sorted(as_path(run_dir).glob("step-*")):
        why = not_whole(entry)
        if why and warn is not None:
            warn(f"checkpoint left out: {why}")
        elif not why:
            found.append(entry)
    return found


def _check_digest(p: Any, data: bytes | None) -> None:
    """Raise ValueError if `state.pt` at `p` (or its bytes `data`) differs from its seal."""
    record = read_seal(p.parent)
    entry = (record or {}).get("files", {}).get(p.name)
    if entry is None:
        return  # an unsealed checkpoint given by path (eval, predict): torch.load checks it
    if data is None:
        got = _digest(p)
    else:
        got = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if got != {"bytes": entry.get("bytes"), "sha256": entry.get("sha256")}:
        raise ValueError(
            f"checkpoint {str(p)!r} is corrupt or incomplete: {got['bytes']} bytes, sha256 "
            f"{got['sha256'][:12]}, but {SEAL_FILE} says {entry.get('bytes')} bytes, sha256 "
            f"{str(entry.get('sha256'))[:12]}"
        )


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
    if isinstance(p, StoragePath):  # read into memory: torch.load needs a seekable file
        data = p.read_bytes()
        _check_digest(p, data)
        source: Any = io.BytesIO(data)
        mmap = False
    else:
        _check_digest(p, None)
        source = p
    try:
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
