"""Driver side of a sweep: checks, Ray, the MLflow parent run, the Tuner, the results.

The sweep lives in `<checkpoint.storage_path>/sweeps/<name>/`: Tune's experiment state, the
parent run's id (`sweep_run.json`), the expanded trials (`sweep.json`), each trial's Ray Train
run and job directory (`trials/<trial>/`) and the results. Running the same sweep name again
restores it (`Tuner.restore`): finished and early-stopped trials are kept, an interrupted one
continues from its checkpoint in the same MLflow child run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.state import list_placement_groups

from pipeline import ray_session, tracking
from pipeline.config import JobConfig
from pipeline.ray_session import API_SERVER_ENV, autoscaler_max_resources
from pipeline.train.preflight import preflight
from pipeline.tune.callbacks import TRIAL_TAG, SweepTracker
from pipeline.tune.parent import open_parent, reconcile_children
from pipeline.tune.results import Row, best_row, status_of, write_results
from pipeline.tune.search import STUDY_FILE, optuna_searcher, probes, searched_trial
from pipeline.tune.sweep import Sweep, Trial, asha_rungs, check_trials, trial_job
from pipeline.tune.trial import TRIAL_CPU, run_trial

SWEEP_RECORD = "sweep.json"  # in the sweep directory: the sweep and its expanded trials
STATE_API_TIMEOUT_S = 30


@dataclass(frozen=True)
class Prepared:
    """A sweep checked without Ray: its trials' job configs and where everything goes."""

    sweep: Sweep
    trials: list[Trial]
    jobs: list[JobConfig]
    base: dict[str, Any]  # the base job, flat, absolute paths
    base_job: JobConfig
    sweep_dir: Path
    tracking_uri: str
    probes: list[JobConfig] = field(default_factory=list)  # Optuna: each searched value once

    @property
    def checked_jobs(self) -> list[JobConfig]:
        """What preflight checks before Ray starts: every trial's job; with Optuna the probes,
        whose values cover the space (a slot's job lacks the values its trial drew)."""
        return self.probes if self.sweep.algorithm == "optuna" else self.jobs

    @property
    def max_steps(self) -> int:
        return max(j.solver.max_steps for j in self.jobs)


def sweep_tracking_uri(job: JobConfig, storage: Path) -> str:
    """The store every run of a sweep shares: MLFLOW_TRACKING_URI, tracking.uri, or
    `sqlite:///<storage>/sweeps/mlflow.db` on a local cluster.

    A per-job SQLite file cannot hold a parent and its children; a cluster with more than one
    node cannot share a local SQLite file either: there a server is required.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or job.tracking.uri.strip()
    address = job.ray.address or os.environ.get("RAY_ADDRESS", "")
    host = address.split("://")[-1].split(":")[0]
    if not uri:
        if address and host not in ("", "127.0.0.1", "localhost", "auto"):
            raise ValueError(
                "config key 'tracking.uri': a sweep on the cluster at "
                f"{address!r} needs an MLflow tracking server every node reaches "
                "(set tracking.uri or MLFLOW_TRACKING_URI)"
            )
        uri = f"sqlite:///{storage.resolve() / 'sweeps' / 'mlflow.db'}"
    return uri


def prepare(sweep: Sweep, trials: list[Trial], base_job: JobConfig, base: dict) -> Prepared:
    """Every trial's job config, validated (a bad key fails here, naming trial and key)."""
    storage = Path(base_job.checkpoint.storage_path)
    sweep_dir = storage.resolve() / "sweeps" / sweep.name
    uri = sweep_tracking_uri(base_job, storage)
    jobs = [trial_job(base, t, sweep_dir, uri) for t in trials]
    probed = []
    for key, value, probe in probes(sweep):  # Optuna's values: each choice, each range's ends
        try:
            probed.append(trial_job(base, probe, sweep_dir, uri))
        except ValueError as err:
            raise ValueError(f"sweep {sweep.name!r} search {key!r} value {value!r}: {err}") from err
    check_trials(sweep, trials, jobs)
    return Prepared(sweep, trials, jobs, base, base_job, sweep_dir, uri, probed)


def check_record(p: Prepared) -> bool:
    """Compare with the sweep directory's record; True if the sweep exists (a restore).

    Raises:
        ValueError: the name is taken by a sweep with other trials or another base config.
    """
    record = p.sweep_dir / SWEEP_RECORD
    mine = {
        "trials": [asdict(t) for t in p.trials],
        "base": p.base,
    }
    mine = json.loads(json.dumps(mine, default=str))
    if record.is_file():
        saved = json.loads(record.read_text())
        for key in ("trials", "base"):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"sweep {p.sweep.name!r} already exists in {str(p.sweep_dir)!r} with other "
                    f"{'trials' if key == 'trials' else 'base config'}: re-running a sweep name "
                    "resumes it, so run under a new name (--name) or remove that directory"
                )
        return True
    p.sweep_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({**mine, "sweep": p.sweep.to_dict()}, indent=1, default=str))
    return False


def trial_needs(job: JobConfig) -> dict[str, float]:
    """Logical resources one trial holds: its workers, one Ray Data task, its own actor."""
    s = job.scaling
    needs = {"CPU": s.num_workers * s.cpus_per_worker + job.data.decode_cpus + TRIAL_CPU}
    if s.use_gpu:
        needs["GPU"] = float(s.num_workers)
    return needs


def concurrency(
    p: Prepared, cluster: dict[str, float], autoscaler_max: dict[str, float] | None = None
) -> int:
    """How many trials run at once: what the cluster can hold, capped by the sweep's setting.

    An autoscaling cluster may hold nothing yet (KubeRay and the cluster launcher start their
    worker groups at zero): it is counted at the size its autoscaler can grow to, and trials
    beyond what it holds now wait for the nodes it adds, as `preflight.warn_if_short_now` says.

    Args:
        p: the sweep.
        cluster: the cluster's resources now (`ray.cluster_resources()`).
        autoscaler_max: the most the cluster's autoscaler can add up to
            (`ray_session.autoscaler_max_resources`); {} or None for a fixed-size cluster.

    Raises:
        ValueError: naming the config key, if the cluster, grown to its largest, cannot hold
            one trial.
    """
    growable = autoscaler_max or {}
    fits = len(p.trials)
    for job in p.jobs:
        for res, need in trial_needs(job).items():
            have = max(cluster.get(res, 0.0), growable.get(res, 0.0))
            n = int(have / need + 1e-9) if need > 0 else fits
            if n < 1:
                s = job.scaling
                where = (
                    "this autoscaling cluster grows to at most" if growable else "the cluster has"
                )
                raise ValueError(
                    f"config key 'scaling.num_workers': a trial needs {need:g} {res} "
                    f"({s.num_workers} workers x {s.cpus_per_worker:g} CPU, "
                    f"{job.data.decode_cpus:g} for Ray Data and the trial's own actor), "
                    f"but {where} {have:g}"
                )
            fits = min(fits, n)
    return min(fits, p.sweep.concurrency) if p.sweep.concurrency else fits


def connect(job: JobConfig, jobs: list[JobConfig]) -> None:
    """Join the configured cluster, or start a local one with the dashboard; check its state API.

    Ray Train removes a stopped trial's worker placement group through a detached cleaner that
    asks the dashboard's state API whether the trial's Train controller is alive. The cleaner
    finds that API through `RAY_API_SERVER_ADDRESS` (else by looking for *the* Ray instance of
    its machine, which fails where several run): every process of the sweep gets it. Without
    it a stopped trial's placement group stays and every later trial waits for workers.
    """
    ray_session.connect(
        job.ray.address,
        num_cpus=job.ray.num_cpus,
        min_cpus=max(trial_needs(j)["CPU"] for j in jobs) + 1,
        state_api=True,
    )
    check_state_api()


def check_state_api(timeout: float = STATE_API_TIMEOUT_S) -> None:
    """Fail with a message, not a hang, if the cluster's state API does not answer."""
    if not os.environ.get(API_SERVER_ENV):
        url = ray._private.worker.global_worker.node.address_info.get("webui_url", "")
        if url:
            os.environ[API_SERVER_ENV] = url if "://" in url else f"http://{url}"
    try:
        list_placement_groups(limit=1, timeout=int(timeout), raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 - any failure means no cleaner: say so
        raise ValueError(
            "the Ray cluster's state API (dashboard) does not answer: Ray Train's placement "
            "group cleaner needs it to free a stopped trial's workers; start the cluster with "
            f"the dashboard (ray start --include-dashboard=true) ({type(err).__name__}: {err})"
        ) from err


def trial_name(trial: Any) -> str:
    """Tune's name for a trial: the sweep's trial name and Tune's id."""
    return f"{trial.config['trial']}_{trial.trial_id}"


def reuse_actors(scheduler: str) -> bool:
    """Whether a finished trial's process takes the next trial.

    Under FIFO a trial stops only when its function returns, so its warm process (imports,
    MLflow client) can start the next trial at once instead of a new one importing for ~4 s.
    ASHA stops trials early: a stopped trial's actor must exit, and its Train run with it.
    """
    return scheduler == "fifo"


def _scheduler(p: Prepared) -> Any:
    """ASHA over training steps (a rung at least every evaluation), or FIFO."""
    if p.sweep.scheduler != "asha":
        return FIFOScheduler()
    every = p.jobs[0].eval.every_steps
    return ASHAScheduler(
        time_attr="step",  # Tune's iteration count restarts when a trial is restored
        max_t=p.max_steps,
        grace_period=p.sweep.grace_period or every,
        reduction_factor=p.sweep.reduction_factor,
        stop_last_trials=False,  # a trial reaching max_steps logs its model and closes
    )


def build_tuner(
    p: Prepared,
    parent_run_id: str,
    max_concurrent: int,
    restore: bool,
    autoscaler_max: dict[str, float] | None = None,
) -> Any:
    """A new Tuner for the sweep's trials, or the restored one of an interrupted sweep.

    Args:
        p: the sweep.
        parent_run_id: the sweep's MLflow run.
        max_concurrent: trials at a time (`concurrency`).
        restore: restore the sweep's saved Tuner if there is one.
        autoscaler_max: what the cluster's autoscaler can add up to, for the trials' checks.
    """
    setup = {
        "base": p.base,
        "sweep_dir": str(p.sweep_dir),
        "tracking_uri": p.tracking_uri,
        "parent_run_id": parent_run_id,
        "sweep": p.sweep.name,
        "trials": {t.name: asdict(t) for t in p.trials},
        "spec": p.sweep,  # decodes an Optuna trial's values
        "autoscaler_max": autoscaler_max,
    }
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_CPU}
    )
    if restore and tune.Tuner.can_restore(str(p.sweep_dir)):
        return tune.Tuner.restore(
            str(p.sweep_dir), trainable, resume_unfinished=True, resume_errored=False
        )
    # Random sweeps are expanded up front (pipeline.tune.sweep); Optuna draws as trials end.
    optuna = p.sweep.algorithm == "optuna"
    space = None if optuna else {"trial": tune.grid_search([t.name for t in p.trials])}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=p.sweep.metric,
            mode=p.sweep.mode,
            scheduler=_scheduler(p),
            search_alg=optuna_searcher(p.sweep, p.sweep_dir) if optuna else None,
            num_samples=p.sweep.samples if optuna else 1,
            max_concurrent_trials=max_concurrent,
            reuse_actors=reuse_actors(p.sweep.scheduler),
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=p.sweep.name,
            storage_path=str(p.sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=p.sweep.max_failures),
            callbacks=[SweepTracker(p.tracking_uri, parent_run_id, p.max_steps)],
            verbose=1,
        ),
    )


def saved_trials(p: Prepared) -> list[Any]:
    """The sweep's trials as Tune saved them: what a restore resumes.

    After an interrupt (Ctrl-C) Tune stops the running trials, but saves them unfinished first;
    the saved state, not the stopped objects, tells an interrupted trial from an early stop.
    """
    return list(ExperimentAnalysis(str(p.sweep_dir)).trials)


def sweep_trials(p: Prepared, saved: list[Any]) -> list[Trial]:
    """The sweep's trials in order; an Optuna sweep's with the values its saved trials drew
    (slots Optuna has not filled yet keep the common set)."""
    if p.sweep.algorithm != "optuna":
        return p.trials
    known = {t.name: t for t in p.trials}
    for trial in saved:
        drawn = {k: v for k, v in trial.config.items() if k != "trial"}
        known[trial.config["trial"]] = searched_trial(p.sweep, trial.config["trial"], drawn)
    return [known[name] for name in sorted(known)]


def collect(p: Prepared, trials: list[Any]) -> list[Row]:
    """One row a trial, in the sweep's order, from Tune's saved trials."""
    by_name = {}
    for trial in trials:
        by_name[trial.config["trial"]] = trial
    rows = []
    for t in sweep_trials(p, trials):
        trial = by_name.get(t.name)
        last = dict(getattr(trial, "last_result", None) or {}) if trial else {}
        step = int(last.get("step", 0) or 0)
        status = (
            status_of(
                trial.status == "ERROR",
                trial.status in ("TERMINATED", "ERROR"),
                step,
                p.max_steps,
            )
            if trial
            else "unfinished"
        )
        nan = math.nan
        rows.append(
            Row(
                trial=t.name,
                overrides=t.overrides,
                steps=step,
                bbox_AP=float(last.get("bbox_AP", nan)) if step else nan,
                segm_AP=float(last.get("segm_AP", nan)) if step else nan,
                status=status,
                paper=t.paper,
                metric=float(last.get(p.sweep.metric, nan)) if step else nan,
                group=t.group,
            )
        )
    return rows


def finish(p: Prepared, parent_run_id: str, rows: list[Row]) -> dict[str, Any]:
    """Results to the sweep directory and the parent run; the best trial marked, its model
    promoted to the sweep's champion (`tracking.promote_champion`) if it beats it."""
    uri = p.tracking_uri
    reconcile_children(p.tracking_uri, parent_run_id, rows)
    title = f"sweep {p.sweep.name}: COCO AP per trial" + (
        " (hatched: the paper's)" if any(r.paper for r in rows) else ""
    )
    paths = write_results(
        rows, p.sweep_dir / "results", title, p.sweep.set, p.sweep.search, p.sweep.metric
    )
    for path in paths.values():
        tracking.log_artifact_file(uri, parent_run_id, path, "results")
    if (p.sweep_dir / STUDY_FILE).is_file():  # Optuna's study, for optuna.load_study
        tracking.log_artifact_file(uri, parent_run_id, p.sweep_dir / STUDY_FILE, "optuna")
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "early-stopped", "failed")}
    tracking.log_metrics(uri, parent_run_id, {f"trials_{k}": v for k, v in counts.items()}, 0)
    best, best_run = best_row(rows, p.sweep.mode), ""
    if best is not None:
        tracking.log_params(uri, parent_run_id, {"best.trial": best.trial})
        tracking.log_params(uri, parent_run_id, {f"best.{k}": v for k, v in best.overrides.items()})
        metrics = {"best.steps": best.steps, "best.bbox_AP": best.bbox_AP}
        metrics.update({"best.segm_AP": best.segm_AP, f"best.{p.sweep.metric}": best.metric})
        tracking.log_metrics(uri, parent_run_id, metrics, best.steps)
        for run in tracking.child_runs(uri, parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == best.trial:
                tracking.set_tags(uri, run.info.run_id, {"sweep.best": "true"})
                best_run = run.info.run_id
        tracking.set_tags(uri, parent_run_id, {"sweep.best_trial": best.trial})
    unfinished = any(r.status == "unfinished" for r in rows)
    champion = None  # the best trial's model, registered as the sweep's champion if it wins
    if best is not None and best_run and not unfinished:
        s = p.sweep
        champion = tracking.promote_champion(uri, s.name, best_run, s.metric, s.mode, best.metric)
        print(f"[tune] {champion.message}", flush=True)
    tracking.finish_run(uri, parent_run_id, "KILLED" if unfinished else "FINISHED")
    return {
        "rows": rows,
        "best": best,
        "paths": paths,
        "unfinished": unfinished,
        "champion": champion,
    }


def run_sweep(p: Prepared) -> dict[str, Any]:
    """Check, connect, open the parent run, run (or restore) the Tuner, report.

    Returns:
        {"rows", "best", "paths", "unfinished", "champion" (a `tracking.Promotion`, None if
        no trial finished or the sweep is unfinished), "tracking_uri", "parent_run_id",
        "sweep_dir", "elapsed_s"}.
    """
    t0 = time.perf_counter()
    for job in p.checked_jobs:
        preflight(job)  # data and resume checks of every trial, before Ray starts
    restore = check_record(p)
    connect(p.base_job, p.jobs)

    # Read here, on the head node, where the autoscaling config is; the trials get it too.
    growable = autoscaler_max_resources()
    max_concurrent = concurrency(p, ray.cluster_resources(), growable)
    parent = open_parent(p.sweep, p.trials, p.base_job, p.sweep_dir, p.tracking_uri)
    rungs = ""
    if p.sweep.scheduler == "asha":
        steps = asha_rungs(p.sweep, p.jobs[0].eval.every_steps, p.max_steps)
        rungs = f", ASHA rungs at steps {steps}"
    print(
        f"[tune] sweep {p.sweep.name!r}: {len(p.trials)} trials, {max_concurrent} at a time, "
        f"metric {p.sweep.metric} ({p.sweep.mode}){rungs}; "
        f"{'restoring' if restore else 'starting'} in {p.sweep_dir}",
        flush=True,
    )
    try:
        tuner = build_tuner(p, parent, max_concurrent, restore, growable)
        tuner.fit()
        rows = collect(p, saved_trials(p))
        out = finish(p, parent, rows)
    finally:
        left = tracking.close_outbox(p.tracking_uri, parent)
        if left:
            print(left, flush=True)
    out.update(
        tracking_uri=p.tracking_uri,
        parent_run_id=parent,
        sweep_dir=str(p.sweep_dir),
        elapsed_s=time.perf_counter() - t0,
    )
    return out
