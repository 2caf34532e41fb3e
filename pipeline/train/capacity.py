"""A job that cannot get its workers back stops, naming the nodes it lost.

When a node goes, Ray Train restarts the worker group; while the cluster has no room for it, each
start waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s) for its placement group and fails
with `WorkerGroupStartupTimeoutError`, a controller failure Ray retries `controller_failure_limit`
times (unbounded by default: a fixed-size job whose node never returns would wait for ever, its
MLflow run RUNNING). `ray.capacity_wait_s` bounds the waiting: the limit is that many seconds of
start timeouts, counted over the job's driver (Ray keeps one count per `fit`, never reset). Then
`stop_said`, around the driver's `fit`, raises `CapacityError` naming the nodes lost since the
job started; the run has ended FAILED, and running the job again resumes it from its last
checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import ray
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

# Ray Train V2's variable and default (ray/train/v2/_internal/constants.py, Ray 2.60).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 60.0


class CapacityError(RuntimeError):
    """The cluster had no room for the job's workers for `ray.capacity_wait_s` seconds."""


def start_timeout_s() -> float:
    """How long one worker-group start waits for its resources (the Train controller reads the
    same variable: a job's `runtime_env` sets it for both)."""
    return float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))


def controller_failure_limit(wait_s: float) -> int:
    """`FailureConfig.controller_failure_limit` for `wait_s` seconds of failed starts.

    Ray raises at the first failure past the limit: the job stops after about `wait_s` seconds,
    never less than one start timeout. 0 waits for ever (-1, Ray's default)."""
    if wait_s <= 0:
        return -1
    return max(1, math.ceil(wait_s / start_timeout_s())) - 1


def dead_nodes() -> set[str]:
    """The ids of the cluster's nodes that have died so far (Ray lists them until it restarts)."""
    return {n["NodeID"] for n in ray.nodes() if not n["Alive"]}


def timed_out(err: BaseException) -> bool:
    """Whether Ray Train gave up starting the workers (`WorkerGroupStartupTimeoutError`)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(getattr(cause, "controller_failure", None), WorkerGroupStartupTimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


@contextlib.contextmanager
def stop_said(job_name: str, wait_s: float, scaling: Any) -> Iterator[None]:
    """Within: a Ray Train run that gave up starting its workers raises `CapacityError` with
    `explain`'s message (other errors pass through).

    Args:
        job_name, wait_s: the job's name and `ray.capacity_wait_s`.
        scaling: the trainer's `ScalingConfig`.
    """
    dead_before = dead_nodes()
    try:
        yield
    except Exception as err:
        if not timed_out(err):
            raise
        raise CapacityError(explain(job_name, wait_s, scaling, dead_before)) from err


def explain(job_name: str, wait_s: float, scaling: Any, dead_before: set[str]) -> str:
    """The message of a job stopped for want of room: what it waited for, which nodes it lost.

    Args:
        job_name, wait_s: the job's name and `ray.capacity_wait_s`.
        scaling: the trainer's `ScalingConfig` (`num_workers`: a count, or (min, max) elastic).
        dead_before: `dead_nodes()` when the job started.
    """
    # Those that joined during the job too (a lost node started again, then lost for good).
    dead = [n for n in ray.nodes() if not n["Alive"] and n["NodeID"] not in dead_before]
    lost = "; ".join(
        f"{n['NodeID']} at {n['NodeManagerAddress']}"
        + (f" ({reason})" if (reason := n.get("DeathReasonMessage")) else "")
        for n in dead
    )
    where = (
        f"nodes lost since the job started: {lost}"
        if lost
        else "no node has died since it started (other work may hold the room)"
    )
    workers = scaling.num_workers
    count = f"{workers[0]} to {workers[1]}" if isinstance(workers, tuple) else str(workers)
    return (
        f"job {job_name!r} stopped: no room on the cluster for its {count} workers "
        f"({scaling.resources_per_worker} each) for {wait_s:g} s (ray.capacity_wait_s; one try "
        f"waits {start_timeout_s():g} s, {START_TIMEOUT_ENV}); {where}. Bring nodes with that "
        "room back or lower scaling.num_workers, then run the job again: it resumes from its "
        "last checkpoint."
    )
