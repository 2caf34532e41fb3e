"""Sweeps end to end on one local Ray cluster (with its dashboard) and one real `mlflow server`.

An ASHA sweep whose poor trial (a learning rate that cannot learn) is stopped at the first
rung and whose diverging trial fails without stopping the sweep; the parent run with its nested
children, their params, metrics and final statuses, the results table and chart; an Optuna
sweep interrupted and restored by name with its study, its champion registered once it ends;
no placement group left behind. ASHA starts a process per trial (an early stop ends it), FIFO
hands a finished trial's process to the next.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from pipeline.ray_session import API_SERVER_ENV, LOCAL_ONLY_ENV, start_local
from pipeline.tune.runner import prepare, run_sweep
from pipeline.tune.sweep import base_job, expand, load_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"
BUDGET = {  # a tiny trial: 6 steps of 128-160 px images on one worker, evaluated every 2 steps
    "scaling.num_workers": 1,
    "solver.max_steps": 6,
    "solver.warmup_steps": 0,
    "eval.every_steps": 2,
    "checkpoint.every_steps": 2,
    "log_every": 2,
    "data.train_scales": [128, 160],
    "data.max_size": 200,
    "eval.pictures": 0,
    "tracking.log_model": False,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local Ray instance for every sweep of the module, with the dashboard (state API).

    In-process, not the session's token cluster: a process's Ray auth mode is fixed by its
    first `ray.init`, and earlier tests of this process ran without a token. The dashboard's
    address `start_local` puts in the environment goes with the instance."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(API_SERVER_ENV, "")  # set by `start_local`; undone with the instance
        start_local(4, state_api=True)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()


@pytest.fixture(scope="module")
def server(mlflow_uri: str) -> str:
    return mlflow_uri  # the session's server (tests/conftest.py)


# The module's instance listens on 127.0.0.1 only (`ray_session.loopback_node`): a process that
# joins it by address does so in Ray's local-only mode too, or Ray would swap 127.0.0.1 for the
# machine's network address, where nothing listens.
JOIN_LOOPBACK = {LOCAL_ONLY_ENV: "0"}


def sweep_file(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def base_sets(shards: dict[str, Path], storage: Path, server: str) -> dict:
    return {
        **BUDGET,
        "data.train": str(shards["train"]),
        "data.val": str(shards["val"]),
        "checkpoint.storage_path": str(storage),
        "tracking.uri": server,
        "tracking.experiment": "tune-test",
    }


def live_placement_groups(timeout: float = 90, before: frozenset = frozenset()) -> list[str]:
    """Placement groups not REMOVED once Ray Train's cleaner had `timeout` s to act, apart from
    those live `before` (other jobs' on the shared cluster)."""
    deadline = time.monotonic() + timeout
    while True:
        live = [
            pg_id
            for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED" and pg_id not in before
        ]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(2)


def trial_actors() -> Counter:
    """How many trial actors (Tune's `ImplicitFunc`) each job of the cluster has started, read
    from the GCS's actor table, dead actors included."""
    from ray._private.state import actors

    return Counter(a["JobID"] for a in actors().values() if a["ActorClassName"] == "ImplicitFunc")


def reporting_pids(sweep_dir: Path) -> dict[str, set[int]]:
    """The process ids each trial reported from (`pid` in Tune's `<trial>_<id>/result.json`)."""
    out: dict[str, set[int]] = {}
    for path in sweep_dir.glob("*/result.json"):
        lines = path.read_text().splitlines()
        if lines:
            trial = path.parent.name.rsplit("_", 2)[0]
            out[trial] = {json.loads(line)["pid"] for line in lines}
    return out


def children(client: MlflowClient, parent: str) -> dict[str, object]:
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags["sweep.trial"]: r for r in runs}


def test_asha_sweep_nested_in_mlflow(
    shards: dict, cluster: str, server: str, tmp_path: Path
) -> None:
    path = sweep_file(
        tmp_path / "asha.yaml",
        name="asha",
        metric="train_loss",
        scheduler="asha",
        asha={"grace_period": 4},
        variants=[
            {"name": "good", "set": {"solver.base_lr": 0.003}, "paper": {"segm_AP": 37.6}},
            {"name": "poor", "set": {"solver.base_lr": 1e-9}},  # cannot learn
            # Diverges at its second step; neither Train nor Tune retries it.
            {"name": "diverges", "set": {"solver.base_lr": 1e30, "ray.max_failures": 0}},
        ],
        max_failures=0,
        concurrency=1,  # in this order, so the poor trial meets the good one at the rung
    )
    sweep = load_sweep(str(path))
    job, base = base_job(CONFIG, base_sets(shards, tmp_path / "runs", server))
    groups = frozenset(live_placement_groups(timeout=0))
    result = run_sweep(prepare(sweep, expand(sweep), job, base))

    status = {r.trial: r.status for r in result["rows"]}
    assert status == {"good": "finished", "poor": "early-stopped", "diverges": "failed"}
    steps = {r.trial: r.steps for r in result["rows"]}
    assert steps == {"good": 6, "poor": 4, "diverges": 0}
    assert not result["unfinished"]
    # An early stop must end the trial's process (and its Train run): ASHA reuses none. The
    # process ids Tune filled into the reports (the diverging trial reported nothing); the
    # actor table of an in-process driver came back without them once in a full run.
    pids = reporting_pids(tmp_path / "runs" / "sweeps" / "asha")
    assert set(pids) == {"good", "poor"} and pids["good"].isdisjoint(pids["poor"]), pids

    client = MlflowClient(server)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.trials"] == "3"
    kids = children(client, parent.info.run_id)
    assert set(kids) == {"good", "poor", "diverges"}
    assert kids["diverges"].info.status == "FAILED"
    assert kids["diverges"].data.tags["sweep.failed"] == "true"
    assert parent.data.metrics["trials_failed"] == 1
    failed = kids.pop("diverges")
    for name, run in kids.items():
        assert run.info.experiment_id == parent.info.experiment_id
        assert run.info.status == "FINISHED"
        assert run.data.params["sweep.trial"] == name
        assert run.data.tags["mlflow.source.name"] == "panet tune"
        assert "segm/AP" in run.data.metrics and "train/loss" in run.data.metrics
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val"}
        assert json.loads(inputs["train"].dataset.profile)["num_rows"] == 24
    assert kids["poor"].data.params["solver.base_lr"] == "1e-09"
    assert kids["poor"].data.tags["sweep.early_stopped"] == "true"
    assert kids["poor"].data.tags["sweep.stopped_at_step"] == "4"
    assert "sweep.early_stopped" not in kids["good"].data.tags
    assert parent.data.params["best.trial"] == "good"
    assert kids["good"].data.tags["sweep.best"] == "true"
    assert result["champion"].outcome == "skipped"  # tracking.log_model is off: no model
    assert "sweep.best" not in kids["poor"].data.tags

    # The parent holds the table and the chart, with the trials' numbers.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert artifacts == {"results/results.md", "results/results.csv", "results/results.png"}
    local = Path(client.download_artifacts(parent.info.run_id, "results/results.csv"))
    table = {r["trial"]: r for r in csv.DictReader(io.StringIO(local.read_text()))}
    for name, run in kids.items():
        ap = run.data.metrics["segm/AP"]
        assert float(table[name]["segm_AP"]) == pytest.approx(ap, abs=1e-6)
    assert table["poor"]["status"] == "early-stopped" and table["good"]["paper_segm_AP"] == "37.6"
    assert table["diverges"]["status"] == "failed" and table["diverges"]["segm_AP"] == ""
    assert failed.data.params["solver.base_lr"] == "1e+30"
    assert live_placement_groups(before=groups) == []


def run_cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`panet ...` in its own session (its process group takes the SIGINT), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: not reached\n{log.read_text()[-4000:]}")
        time.sleep(1)


def test_optuna_sweep_interrupted_and_resumed(
    shards: dict, cluster: str, server: str, tmp_path: Path
) -> None:
    """Optuna draws each trial's values (a list-valued choice included); the sweep, interrupted in
    its second trial (`Tuner.restore`, as for a grid sweep), resumes that trial with the same
    values in the same MLflow run and does not rerun the first; the study beside the results
    holds both trials with the scores MLflow has. The parent run carries the search picture, and
    only the finished sweep registers its champion."""
    path = sweep_file(
        tmp_path / "opt.yaml",
        name="opt",
        samples=2,
        concurrency=1,
        set={"data.scale_range": False},  # the choices are sets of short sides
        search={
            "algorithm": "optuna",
            "solver.base_lr": {"loguniform": [0.001, 0.005]},
            "data.train_scales": {"choice": [[128], [128, 160]]},
        },
    )
    storage = tmp_path / "runs"
    args = ["tune", "--sweep", str(path), "--config", str(CONFIG)]
    sets = base_sets(shards, storage, server)
    sets["tracking.log_model"] = True  # a champion to register
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "RAY_ADDRESS": cluster, "PYTHONPATH": str(REPO), **JOIN_LOOPBACK}
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the driver finds it from the cluster's address
    env.pop("MLFLOW_TRACKING_URI", None)
    sweep_dir = storage / "sweeps" / "opt"

    log1 = tmp_path / "first.log"
    before = trial_actors()
    groups = frozenset(live_placement_groups(timeout=0))
    proc = run_cli(args, env, log1)
    second = sweep_dir / "trials" / "trial-001"
    wait_for(
        "trial-001's first checkpoint", lambda: any(second.glob("step-*/state.pt")), proc, log1
    )
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=300)
    first_log = log1.read_text()
    interrupted_at = int(sorted(second.glob("step-*"))[-1].name.split("-")[1])
    assert not (second / "step-00000006").exists(), "interrupted too late"
    assert "the sweep was interrupted" in first_log
    assert "unfinished" in first_log.split("| trial-001 |")[-1].splitlines()[0]
    assert "@champion" not in first_log  # an interrupted sweep promotes nothing
    # FIFO: the second trial ran in the first one's process (one actor for the driver's job).
    assert list((trial_actors() - before).values()) == [1]

    log2 = tmp_path / "second.log"
    proc = run_cli(args, env, log2)
    assert proc.wait(timeout=1800) == 0, log2.read_text()[-4000:]
    text = log2.read_text()
    assert f"resumed from the checkpoint at step {interrupted_at}" in text, text[-4000:]
    assert "resumed from the checkpoint at step 6" not in text  # the first trial is not rerun
    assert "View experiment at" not in first_log + text  # MLflow's own links, off
    assert "[tune] registered v1 as opt@champion (segm_AP " in text

    journal = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    study = optuna.load_study(study_name="opt", storage=journal)
    done = {t.number: t for t in study.trials}
    assert sorted(done) == [0, 1] and all(t.state.name == "COMPLETE" for t in done.values())
    client = MlflowClient(server)
    parent = json.loads((sweep_dir / "sweep_run.json").read_text())["run_id"]
    kids = children(client, parent)
    assert set(kids) == {"trial-000", "trial-001"}
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 2  # the restored trial went on in its own run
    for number, trial in done.items():
        run = kids[f"trial-{number:03d}"]
        assert run.info.status == "FINISHED"
        # The searched keys are the child's params (MLflow's compare view), as Optuna drew them.
        assert float(run.data.params["solver.base_lr"]) == pytest.approx(
            trial.params["solver.base_lr"], rel=1e-9
        )
        assert json.loads(run.data.params["data.train_scales"]) == json.loads(
            trial.params["data.train_scales"]
        )
        assert trial.value == pytest.approx(run.data.metrics["segm/AP"], abs=1e-9)
    resumed = client.get_metric_history(kids["trial-001"].info.run_id, "segm/AP")
    assert sorted(m.step for m in resumed) == [2, 4, 6]  # each evaluation once, across the break
    assert "sweep.early_stopped" not in kids["trial-001"].data.tags  # interrupted, not stopped
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    params = parent_run.data.params
    assert params["sweep.algorithm"] == "optuna"
    assert params["sweep.searched_keys"] == json.dumps(["data.train_scales", "solver.base_lr"])
    artifacts = {a.path for a in client.list_artifacts(parent, "results")}
    assert "results/search.png" in artifacts
    assert {a.path for a in client.list_artifacts(parent, "optuna")} == {"optuna/optuna.journal"}
    table = (sweep_dir / "results" / "results.md").read_text()
    assert "| trial-001 |" in table and "finished" in table.split("| trial-001 |")[1]
    best = kids[params["best.trial"]]
    champion = MlflowClient(server, registry_uri=server).get_model_version_by_alias(
        "opt", "champion"
    )
    assert champion.run_id == best.info.run_id
    held = float(champion.tags["panet.metric_value"])
    assert held == pytest.approx(best.data.metrics["segm/AP"], abs=1e-6)
    assert live_placement_groups(before=groups) == []
