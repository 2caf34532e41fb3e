"""Errors that would repeat on every retry fail a run once, with their one-line message.

Ray Train V2 retries every worker-group error up to `FailureConfig.max_failures` (its
`DefaultFailurePolicy` retries any `WorkerGroupError` and has no hook to tell a lost node from a
missing file). A worker's setup error that comes from the job's inputs (a weights file that is
missing or does not fit, a checkpoint that cannot be read) fails the same way on each retry. So
the workers catch it, agree over the process group that some rank failed, the failing rank puts
the message into the driver's `ResultBox`, and every rank returns: Ray sees a finished run, the
driver raises the message as the CLI's one-line error.

The box is a Ray actor, not a file: a worker may run on another node than the driver, and
neither that node's local disk nor a temporary directory is the driver's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Raised by the config, weights and checkpoint loaders for bad inputs (they name the file/key).
NON_RETRYABLE = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

T = TypeVar("T")


class ResultBox:
    """What the workers hand the driver: `{"error": message}` from a failed setup and, for
    `panet eval`, `{"metrics": ...}` (Ray Train V2 gives the driver no metrics without a
    checkpoint). Runs as a Ray actor (`result_box`); the first value of a key wins."""

    def __init__(self) -> None:
        self._answer: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self._answer.setdefault(key, value)

    def get(self) -> dict[str, Any]:
        return dict(self._answer)


def result_box() -> Any:
    """A new `ResultBox` actor for one run, owned by the calling driver (it ends with it).

    It takes no CPU, so it never waits for the slots the workers hold, and it lives on the
    driver's node: on a worker's node it would die with that node, and a job that goes on after
    losing the node could no longer read its answer.
    """
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ResultBox).options(scheduling_strategy=here).remote()


def take_answer(box: Any) -> dict[str, Any]:
    """What the workers put into `box`, once they have returned; the actor is then freed.

    Raises:
        ValueError: with the message of a worker's setup error, if one was put.
    """
    answer: dict[str, Any] = ray.get(box.get.remote())
    ray.kill(box)
    if "error" in answer:
        raise ValueError(str(answer["error"]))
    return answer


def setup_or_none(fn: Callable[[], T], box: Any, device: torch.device) -> T | None:
    """Run a worker's setup step on every rank; None on every rank if it failed on any.

    Call it at the same point on every rank (it takes part in one all-reduce).

    Args:
        fn: the setup step (e.g. building the model, which loads its weights).
        box: the driver's `ResultBox` actor; the failing rank puts `"error"` into it.
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
        ray.get(box.put.remote("error", str(error)))
    return None if flag.item() > 0 else result
