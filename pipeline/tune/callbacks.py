"""The sweep's two callbacks: metrics from Train to Tune, and final statuses into MLflow."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline import tracking

PARENT_TAG = "mlflow.parentRunId"  # nests a child run under its parent in the MLflow UI
TRIAL_TAG = "sweep.trial"


class FreshEvalReportCallback(TuneReportCallback):
    """Ray Train callback of a trial: forward to Tune only reports that follow a fresh
    evaluation.

    The worker loop reports at every checkpoint; a checkpoint between two evaluations carries
    the metrics of the previous one (`fresh_eval` 0), which a scheduler must not compare.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if metrics and metrics[0].get("fresh_eval", 0.0) >= 1.0:
            super().after_report(run_context, metrics, checkpoint)


class SweepTracker(tune.Callback):
    """Tune callback on the driver: each child run's final status, early stops tagged.

    Args:
        tracking_uri: the sweep's store.
        parent_run_id: the sweep's parent run.
        max_steps: a trial that completes before this step was stopped early by the scheduler.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, max_steps: int) -> None:
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.max_steps = max_steps

    def child_run(self, trial: Any) -> str | None:
        """The MLflow child run of a Tune trial, or None if the trial never opened one."""
        name = trial.config["trial"]
        for run in tracking.child_runs(self.tracking_uri, self.parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == name:
                return run.info.run_id
        return None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.child_run(trial)
        if run_id is None:
            return
        step = int((trial.last_result or {}).get("step", 0) or 0)
        if step < self.max_steps:
            tags = {"sweep.early_stopped": "true", "sweep.stopped_at_step": step}
            tracking.set_tags(self.tracking_uri, run_id, tags)
        tracking.finish_run(self.tracking_uri, run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.child_run(trial)
        if run_id is None:
            return
        tracking.set_tags(self.tracking_uri, run_id, {"sweep.failed": "true"})
        tracking.finish_run(self.tracking_uri, run_id, "FAILED")
