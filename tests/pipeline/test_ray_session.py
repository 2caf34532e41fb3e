"""The settings a local Ray instance starts with: set unless the user set them."""

from __future__ import annotations

import pytest

from pipeline.ray_session import MIN_WORKERS_SOFT_LIMIT, local_ray_env

SOFT_LIMIT = "RAY_num_workers_soft_limit"


def test_soft_limit_never_below_the_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (SOFT_LIMIT, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.delenv(key, raising=False)
    assert local_ray_env(4)[SOFT_LIMIT] == str(MIN_WORKERS_SOFT_LIMIT)
    monkeypatch.delenv(SOFT_LIMIT)
    settings = local_ray_env(MIN_WORKERS_SOFT_LIMIT * 2)
    assert settings == {
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        SOFT_LIMIT: str(MIN_WORKERS_SOFT_LIMIT * 2),
    }


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOFT_LIMIT, "7")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert local_ray_env(4) == {
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
        SOFT_LIMIT: "7",
    }
