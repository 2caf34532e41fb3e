"""Errors that would repeat on every retry fail a run once, with their one-line message.

Ray Train V2 retries every worker-group error up to `FailureConfig.max_failures` (its
`DefaultFailurePolicy` retries any `WorkerGroupError` and has no hook to tell a lost node from a
missing file). A worker's setup error that comes from the job's inputs (a weights file that is
missing or does not fit, a checkpoint that cannot be read) fails the same way on each retry. So
the workers catch it, agree over the process group that some rank failed, the failing rank
writes the message to a file the driver reads, and every rank returns: Ray sees a finished run,
the driver raises the message as the CLI's one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.storage import as_path

FAILED_FILE = "failed.json"  # in the job directory (or `panet eval`'s output folder)
# Raised by the config, weights and checkpoint loaders for bad inputs (they name the file/key).
NON_RETRYABLE = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

T = TypeVar("T")


def setup_or_none(fn: Callable[[], T], failed_file: Path, device: torch.device) -> T | None:
    """Run a worker's setup step on every rank; None on every rank if it failed on any.

    Call it at the same point on every rank (it takes part in one all-reduce).

    Args:
        fn: the setup step (e.g. building the model, which loads its weights).
        failed_file: where the failing rank writes `{"error": message}` for the driver.
        device: the process group's device.

    Returns:
        fn's result, or None when any rank raised one of `NON_RETRYABLE`.
    """
    result: T | None = None
    error: BaseException | None = None
    try:
        result = fn()
    except NON_RETRYABLE as err:
        error = err
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        as_path(failed_file).parent.mkdir(parents=True, exist_ok=True)
        as_path(failed_file).write_text(json.dumps({"error": str(error)}))
    return None if flag.item() > 0 else result


def clear_failure(failed_file: Path) -> None:
    """Remove a failure file left by an earlier run (call before starting the workers)."""
    as_path(failed_file).unlink(missing_ok=True)


def raise_failure(failed_file: Path) -> None:
    """Raise ValueError with the message a worker wrote to `failed_file`, if there is one."""
    path = as_path(failed_file)
    if not path.is_file():
        return
    try:
        message = str(json.loads(path.read_text())["error"])
    except (OSError, ValueError, KeyError):
        message = f"a worker failed during setup (unreadable {path})"
    path.unlink(missing_ok=True)
    raise ValueError(message)
