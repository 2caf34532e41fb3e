"""`ray_session`: how a local Ray instance starts (its settings: set unless the user set them)."""

from __future__ import annotations

import os

import pytest

from pipeline.ray_session import MIN_WORKERS_SOFT_LIMIT, local_cpus, local_ray_env

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


def test_a_local_instance_gets_the_cpus_its_workers_and_data_tasks_need() -> None:
    cores = os.cpu_count() or 1
    assert local_cpus(0, 1) == cores  # never fewer than the cores
    assert local_cpus(0, cores + 2.5) == cores + 3  # 2 workers x 1 CPU on 2 cores: + data tasks
    assert local_cpus(5, cores + 10) == 5  # ray.num_cpus is taken as it is
