"""`ray.capacity_wait_s`: how it bounds Ray Train's retries of a worker-group start, and how
the driver recognizes the failure. A job stopped this way on a real cluster, with the nodes it
lost named: tests/pipeline/train/test_multinode.py (the node-loss test)."""

from __future__ import annotations

import pytest
from ray.train.v2._internal.exceptions import (
    WorkerGroupStartupFailedError,
    WorkerGroupStartupTimeoutError,
)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from pipeline.config import load_job_config
from pipeline.train.capacity import START_TIMEOUT_ENV, controller_failure_limit, timed_out


@pytest.mark.parametrize(
    ("timeout", "wait", "limit"),
    [
        ("60", 1800.0, 29),  # Ray's default start timeout: 30 tries, the 30th raises
        ("10", 40.0, 3),
        ("10", 45.0, 4),  # rounded up: never less than asked
        ("60", 5.0, 0),  # under one try: the first timeout stops the job
        ("60", 0.0, -1),  # no limit (Ray's default)
    ],
)
def test_the_wait_becomes_ray_trains_controller_failure_limit(
    monkeypatch: pytest.MonkeyPatch, timeout: str, wait: float, limit: int
) -> None:
    monkeypatch.setenv(START_TIMEOUT_ENV, timeout)
    assert controller_failure_limit(wait) == limit


def test_only_a_start_timeout_counts_as_no_room() -> None:
    no_room = ControllerError(WorkerGroupStartupTimeoutError(num_workers=2))
    assert timed_out(no_room)
    try:  # as the driver sees it: raised from inside `fit_run`
        try:
            raise no_room
        except ControllerError as err:
            raise RuntimeError("wrapped") from err
    except RuntimeError as wrapped:
        assert timed_out(wrapped)
    assert not timed_out(ControllerError(WorkerGroupStartupFailedError("actor died")))
    assert not timed_out(WorkerGroupError("worker failed", worker_failures={}))
    assert not timed_out(ValueError("config key 'x'"))


def test_a_negative_wait_is_refused_naming_the_key() -> None:
    sets = {"data.train": "t", "data.val": "v", "ray.capacity_wait_s": -1}
    with pytest.raises(ValueError, match="config key 'ray.capacity_wait_s'"):
        load_job_config(None, sets)
