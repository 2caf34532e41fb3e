"""Settings of a local Ray instance that `panet train`, `panet eval` or `panet tune` starts.

They go in the environment before `ray.init` starts the instance, so its raylet and every
worker read them. A variable the user set wins; a cluster's own settings are left alone.
"""

from __future__ import annotations

import os

# Worker processes the raylet keeps before it kills idle ones (Ray's default: the CPU count).
MIN_WORKERS_SOFT_LIMIT = 32


def local_ray_env(num_cpus: int) -> dict[str, str]:
    """Set the local instance's settings in `os.environ`; returns the ones in effect."""
    settings = {
        # One machine has no preemptible nodes; the watcher's actor logs an error-level
        # `core_worker.cc ... PreemptionWatcher` line at every start. Read by the Train controller.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # A run starts a dozen actors; with the soft limit at the CPU count (4 here) the raylet
        # kills the idle Ray Data task workers of a finished run, and in a sweep the next trial
        # started its data pipeline in new processes (about 4 s a trial on 2 cores).
        "RAY_num_workers_soft_limit": str(max(num_cpus, MIN_WORKERS_SOFT_LIMIT)),
    }
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in settings}
