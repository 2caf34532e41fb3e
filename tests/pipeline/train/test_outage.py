"""A training job whose MLflow server goes down, on a real local Ray and a real `mlflow server`
that the test stops (its process group) and starts again on the same port and store.

Down mid-job: training goes on; what was logged meanwhile arrives once the server is back, in
order, in the same run. Down at the end: the job ends, names what it could not deliver and
where it is kept; `panet tracking sync` delivers it later, nothing twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from pipeline.config import load_job_config
from pipeline.tracking.journal import Journal, journals
from pipeline.tracking.outbox import undelivered
from pipeline.train.driver import run_training
from tests.mlflow_server import RestartableServer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"
PICTURE = "predictions/predictions_step{:08d}.png"


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(restartable_mlflow: RestartableServer) -> RestartableServer:
    return restartable_mlflow  # this module's own: its tests stop and start it


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def job_for(shards: dict[str, Path], storage: Path, uri: str, **sets):
    base = {
        "name": "outage-job",
        "data.train": str(shards["train"]),
        "data.val": str(shards["val"]),
        "scaling.num_workers": 1,
        "solver.ims_per_batch": 2,
        "model.afp.fusion": "sum",  # no level-share chart at each evaluation: cheaper
        "solver.max_steps": 4,
        "solver.warmup_steps": 2,
        "log_every": 1,
        "checkpoint.every_steps": 2,
        "eval.every_steps": 2,
        "eval.pictures": 1,
        "checkpoint.storage_path": str(storage),
        "tracking.uri": uri,
        "tracking.log_model": False,
        "tracking.retry_max_s": 1.0,
    }
    return load_job_config(CONFIG, {**base, **sets})


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def rank0_journal(outbox: Path, known: set[str]) -> Journal | None:
    """The newest journal of a rank-0 worker that is not in `known`."""
    found = [j for j in journals(outbox) if "-rank0-" in j.name and j.name not in known]
    return found[-1] if found else None


def in_background(fn: Callable[[], None]) -> Callable[[], None]:
    """Run `fn` in a thread; the returned function joins it and re-raises its error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout=300)
        assert not thread.is_alive()
        if errors:
            raise errors[0]

    return join


def check_run(client: MlflowClient, run_id: str, steps: int) -> None:
    """Every step's loss once and in order, every evaluation's picture, the run FINISHED."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, steps + 1))
    assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    evaluated = list(range(2, steps + 1, 2))
    assert [m.step for m in client.get_metric_history(run_id, "segm/AP")] == evaluated
    pictures = {a.path for a in client.list_artifacts(run_id, "predictions")}
    assert pictures == {PICTURE.format(s) for s in evaluated}
    assert run.data.params["model.afp.fusion"] == "sum" and "data.manifest_id" in run.data.params
    experiment = client.get_experiment_by_name(run.data.params.get("tracking.experiment"))
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_server_down_mid_job(cluster, shards, server, storage) -> None:
    job = job_for(shards, storage, server.uri, **{"tracking.flush_timeout_s": 60.0})
    outbox = storage / "outage-job" / "mlflow-outbox"
    seen: dict[str, int] = {}

    def outage() -> None:
        wait_for(lambda: (j := rank0_journal(outbox, set())) and j.acked >= 1, 300, "a step")
        server.stop()
        j = rank0_journal(outbox, set())
        # Down until the worker has kept losses of later steps and an evaluation's picture.
        wait_for(
            lambda: {"metrics", "artifact"} <= {r["kind"] for r in j.pending()}, 300, "records"
        )
        seen["kept while down"] = len(j.pending())
        time.sleep(2.0)
        server.start()

    join = in_background(outage)
    result = run_training(job)
    join()
    assert seen["kept while down"] >= 2
    check_run(MlflowClient(server.uri), result["run_id"], 4)
    for j in journals(outbox):
        assert j.acked == len(j.read()), f"{j.name}: records left"


def test_job_ends_while_server_down(cluster, shards, server, storage, capsys) -> None:
    # The same job trained on to step 6; the server goes down after its first step, for good.
    outbox = storage / "outage-job" / "mlflow-outbox"
    before = {j.name for j in journals(outbox)}
    job = job_for(
        shards, storage, server.uri, **{"solver.max_steps": 6, "tracking.flush_timeout_s": 3.0}
    )

    def outage() -> None:
        wait_for(lambda: (j := rank0_journal(outbox, before)) and j.acked >= 1, 300, "a step")
        server.stop()

    join = in_background(outage)
    capsys.readouterr()
    result = run_training(job)
    join()
    out = capsys.readouterr().out
    # What the message names is what the journals hold undelivered: steps 5 and 6 at least,
    # the evaluation at 6 and its picture, the run's end.
    left = undelivered(outbox)
    assert list(left) == [(server.uri, result["run_id"])]
    counts = left[(server.uri, result["run_id"])]
    assert counts["metrics"] >= 3 and counts["artifact"] == 1 and counts["status FINISHED"] == 1
    assert "MLflow records NOT delivered" in out
    assert (
        f"run {result['run_id']} on {server.uri}: {counts['metrics']} metric batches "
        f"({counts['metric values']} values)" in out
    )
    assert "1 artifact, the run's end (FINISHED)" in out
    assert f"They are kept in {outbox}" in out and f"panet tracking sync {outbox}" in out
    assert result["checkpoint"].endswith("step-00000006")  # training went on to the end

    server.start()
    panet = Path(sys.executable).with_name("panet")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [str(panet), "tracking", "sync", str(outbox), "--timeout", "60"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "every record" in done.stdout
    check_run(MlflowClient(server.uri), result["run_id"], 6)
    assert undelivered(outbox) == {}
