"""One Tune trial: its job config, its MLflow child run, and the same `build_trainer(...).fit()`
as `panet train`.

Train V2 refuses a trainer passed to `Tuner`: a trial is a function that builds and fits a
`TorchTrainer`; its metrics reach Tune through Ray's `TuneReportCallback` on the Train
controller. A re-run of the trial (a restored sweep, a retry) resumes its Ray Train run from
the latest checkpoint and its MLflow run from the job directory's `mlflow_run.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.failures import result_box
from pipeline.quiet import quiet_driver
from pipeline.train.driver import build_trainer, fit_run, open_run
from pipeline.train.preflight import preflight
from pipeline.tune.callbacks import PARENT_TAG, TRIAL_TAG, FreshEvalReportCallback
from pipeline.tune.search import searched_trial
from pipeline.tune.sweep import Trial, trial_job

TRIAL_CPU = 0.01  # the trial actor only waits on its Train controller: 0 CPU is refused by Tune


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune trainable: build the trial's job, open its child run, train.

    Args:
        config: `{"trial": the trial's name}`, and with Optuna the values it drew.
        setup: from the driver: `base` (the flat base job), `sweep_dir`, `tracking_uri`,
            `parent_run_id`, `sweep` (its name), `trials` ({name: Trial fields}), `spec` (the
            `Sweep`, whose search decodes an Optuna trial's values),
            `autoscaler_max` (`ray_session.autoscaler_max_resources` on the driver).
    """
    quiet_driver()  # the trial's process drives its Train run
    drawn = {k: v for k, v in config.items() if k != "trial"}  # Optuna's values, if any
    if drawn:
        trial = searched_trial(setup["spec"], config["trial"], drawn)
    else:
        trial = Trial(**setup["trials"][config["trial"]])
    job = trial_job(setup["base"], trial, Path(setup["sweep_dir"]), setup["tracking_uri"])
    # On the cluster, not this actor's node (any node, a CPU one too), at the size the driver
    # found its autoscaler can reach.
    plan = preflight(job, autoscaler_max=setup.get("autoscaler_max"))
    tags = {
        PARENT_TAG: setup["parent_run_id"],
        TRIAL_TAG: trial.name,
        "sweep.name": setup["sweep"],
        "sweep.overrides": json.dumps(trial.overrides, default=str),
    }
    uri, run_id = open_run(job, plan, tags=tags, entry_point="panet tune")
    own = {"sweep.trial": trial.name, "sweep.variant": trial.variant}
    tracking.log_params(uri, run_id, {**own, "sweep.row": trial.group or trial.name})
    results = result_box()
    trainer = build_trainer(job, plan, uri, run_id, results, [FreshEvalReportCallback()])
    fit_run(trainer, uri, run_id, results)
