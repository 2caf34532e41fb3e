"""The sweep's MLflow parent run: opened with the sweep's params and files, and its child runs
set to their trials' outcome at the end."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline import tracking
from pipeline.config import JobConfig
from pipeline.tune.callbacks import TRIAL_TAG
from pipeline.tune.results import Row
from pipeline.tune.sweep import Sweep, Trial

SWEEP_RUN = "sweep_run.json"  # in the sweep directory: the parent run's id and store


def open_parent(
    sweep: Sweep, trials: list[Trial], base_job: JobConfig, sweep_dir: Path, tracking_uri: str
) -> str:
    """The sweep's MLflow parent run: created once, its id kept in the sweep directory
    (`tracking.open_run`, as a job's)."""
    run_id = tracking.open_run(
        sweep_dir / SWEEP_RUN,
        tracking_uri,
        base_job.tracking.experiment,
        sweep.name,
        {"sweep.name": sweep.name, "sweep.kind": "parent"},
        "panet tune",
        tracking.git_commit(),
    )
    # The parent run's records go through the sweep's outbox, as a job's (`run_sweep` closes it).
    settings = tracking.OutboxSettings(
        base_job.tracking.flush_timeout_s, base_job.tracking.retry_max_s
    )
    tracking.open_outbox(sweep_dir, tracking_uri, run_id, "driver", settings)
    params = {
        "sweep.name": sweep.name,
        "sweep.file": sweep.path,
        "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode,
        "sweep.scheduler": sweep.scheduler,
        "sweep.samples": sweep.samples,
        "sweep.seeds": sweep.seeds,
        "sweep.algorithm": sweep.algorithm,
        "sweep.searched_keys": sorted(sweep.search),
        "sweep.trials": len(trials),
        "sweep.max_failures": sweep.max_failures,
    }
    tracking.log_params(tracking_uri, run_id, params)
    tracking.log_artifact_file(tracking_uri, run_id, sweep.path, "sweep")
    tracking.log_dict(tracking_uri, run_id, base_job.to_dict(), "sweep/base_config.json")
    space = {"set": sweep.set, "search": sweep.search}
    space["variants"] = [asdict(v) for v in sweep.variants]
    tracking.log_dict(tracking_uri, run_id, space, "sweep/search_space.json")
    tracking.log_dict(tracking_uri, run_id, [asdict(t) for t in trials], "sweep/trials.json")
    return run_id


def reconcile_children(tracking_uri: str, parent_run_id: str, rows: list[Row]) -> None:
    """Each child run's final status and early-stop tags from the trials' outcome.

    `SweepTracker` sets them as trials end; an interrupted trial is stopped like an early one,
    so its run is set back here to KILLED, untagged, and a restore resumes it.
    """
    uri = tracking_uri
    early = ["sweep.early_stopped", "sweep.stopped_at_step"]
    runs = {r.data.tags.get(TRIAL_TAG): r for r in tracking.child_runs(uri, parent_run_id)}
    for row in rows:
        run = runs.get(row.trial)
        if run is None:
            continue
        run_id = run.info.run_id
        if row.status == "early-stopped":
            tags = {"sweep.early_stopped": "true", "sweep.stopped_at_step": row.steps}
            tracking.set_tags(uri, run_id, tags)
        else:
            tracking.delete_tags(uri, run_id, early)
        status = {"failed": "FAILED", "unfinished": "KILLED"}.get(row.status, "FINISHED")
        if run.info.status != status:  # ending it again would move its end time
            tracking.finish_run(uri, run_id, status)
