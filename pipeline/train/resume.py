"""Re-running a job name resumes it: on the same data always, with another config only if asked.

A job directory `<storage>/<name>` holds the job's checkpoints (each with the config it was
trained with and its categories) and `job.json` (the data fingerprints of its last start).
`check_job_change` compares a new run with them before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panet_model import PANetConfig
from panet_model.config import flatten
from pipeline.config import JobConfig
from pipeline.storage import as_path
from pipeline.train.checkpoints import latest_state_file, load_resume_state

if TYPE_CHECKING:
    from pipeline.storage import StoragePath

JOB_RECORD = "job.json"  # in the job directory: the data the job trains on
# Keys that change how a job runs, not what it learns: free to change when it resumes
# (raising solver.max_steps trains a finished job on; a moved data directory is recognised by
# its fingerprint).
FREE_KEYS = (
    "name",
    "solver.max_steps",
    "log_every",
    "checkpoint.",
    "eval.",
    "tracking.",
    "ray.",
    "scaling.",
    "data.train",
    "data.val",
    "data.decode_cpus",
    "data.decode_concurrency",
)


def _is_free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE_KEYS)


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[tuple[str, Any, Any]]:
    """The keys whose values differ between two `JobConfig.to_dict()` configs, sorted.

    A checkpoint written before a key existed lacks it: that key counts as changed only if the
    new value is not its default. A key the schema no longer has is left out.

    Args:
        old: the checkpoint's config.
        new: the new run's config.
        defaults: flat default values of the new run's schema and preset.

    Returns:
        [(dotted key, old value or "unset", new value), ...].
    """
    a, b, d = flatten(old), flatten(new), defaults or {}
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - YAML lists vs tuples
    return [
        (k, a.get(k, "unset"), b[k])
        for k in sorted(b)
        if norm(a[k] if k in a else d.get(k, "unset")) != norm(b[k])
    ]


def schema_defaults(preset: str) -> dict[str, Any]:
    """Flat `JobConfig.to_dict()` of the defaults with the model preset `preset`."""
    return flatten(JobConfig(model_preset=preset, model=PANetConfig.preset(preset)).to_dict())


def describe(changes: Sequence[tuple[str, Any, Any]], limit: int = 6) -> str:
    """`key old -> new, ...` for the first `limit` changes."""
    text = ", ".join(f"{k} {old} -> {new}" for k, old, new in changes[:limit])
    more = len(changes) - limit
    return text + (f" and {more} more" if more > 0 else "")


def check_job_change(
    job: JobConfig,
    categories: dict[int, str],
    train_fingerprint: str,
    *,
    allow_changes: bool = False,
) -> list[tuple[str, Any, Any]]:
    """Refuse to resume a job on other data, or with another config unless `allow_changes`.

    Args:
        job: the new run's config.
        categories: the training shards' {category id: name}.
        train_fingerprint: the training shards' manifest fingerprint.
        allow_changes: `panet train --resume`: accept changed keys (they are returned).

    Returns:
        The changed keys (free ones included) when the job has a checkpoint to resume; [] for
        a new job.

    Raises:
        ValueError: one line naming the job directory and what differs.
    """
    path = latest_state_file(job.run_dir)
    if path is None:
        return []
    state = load_resume_state(str(path.parent), mmap=True)  # past an unreadable one, as workers do
    where = f"job {job.name!r} ({job.run_dir}, checkpoint {path.parent.name})"
    saved_cats = {int(k): str(v) for k, v in dict(state.get("categories", {})).items()}
    if saved_cats and saved_cats != dict(categories):
        raise ValueError(
            f"{where} was trained on other categories ({_cats(saved_cats)}) than data.train "
            f"has ({_cats(categories)}): a job resumes on its own data; train a new job "
            "(--new-name), starting from its weights with --set model.weights=<checkpoint>"
        )
    record = read_job_record(job.run_dir)
    saved_print = str(record.get("train_fingerprint", ""))
    if saved_print and train_fingerprint and saved_print != train_fingerprint:
        raise ValueError(
            f"{where} was trained on other shards (manifest fingerprint {saved_print[:12]}, "
            f"data.train {job.data.train!r} has {train_fingerprint[:12]}): a job resumes on "
            "its own data; train a new job (--new-name), starting from its weights with "
            "--set model.weights=<checkpoint>"
        )
    changes = config_changes(
        dict(state.get("config", {})), job.to_dict(), schema_defaults(job.model_preset)
    )
    fixed = [c for c in changes if not _is_free(c[0])]
    if fixed and not allow_changes:
        raise ValueError(
            f"{where} exists with another config ({describe(fixed)}): pass --resume to "
            "continue it with these changes, or --new-name to train a new job"
        )
    return changes


def _cats(categories: dict[int, str]) -> str:
    names = [f"{k}:{v}" for k, v in sorted(categories.items())]
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def read_job_record(run_dir: Path | StoragePath) -> dict[str, Any]:
    """The job directory's `job.json`, or {} if missing or unreadable."""
    try:
        return dict(json.loads((as_path(run_dir) / JOB_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def write_job_record(
    run_dir: Path | StoragePath, train_fingerprint: str, val_fingerprint: str
) -> None:
    """Record the data a job trains on (read by the next run of the same name)."""
    as_path(run_dir).mkdir(parents=True, exist_ok=True)
    record = {"train_fingerprint": train_fingerprint, "val_fingerprint": val_fingerprint}
    (as_path(run_dir) / JOB_RECORD).write_text(json.dumps(record))


def with_free_name(job: JobConfig) -> JobConfig:
    """`job` itself if its name is new, else renamed `<name>-2`, `-3`, ... (`--new-name`)."""
    if not job.run_dir.exists():
        return job
    storage = job.run_dir.parent
    n = 2
    while (storage / f"{job.name}-{n}").exists():
        n += 1
    return dataclasses.replace(job, name=f"{job.name}-{n}")
