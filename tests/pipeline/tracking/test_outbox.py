"""The MLflow outbox against a real `mlflow server` that the test stops and starts again.

A run's records logged while the server is down (the calls a sweep's parent run and a job's
driver make) return at once, are kept in the journal and arrive, in order, once it is back; a
record the server refuses is set aside, not retried; a journal a later process reopens is not
delivered twice. `tests/pipeline/train/test_outage.py` runs the same with a training job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.tracking.journal import Journal, journals
from pipeline.tracking.outbox import Settings, sync, undelivered
from tests.mlflow_server import RestartableServer


@pytest.fixture(scope="module")
def server(restartable_mlflow: RestartableServer) -> RestartableServer:
    return restartable_mlflow  # this module's own: its tests stop and start it


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def test_parent_run_records_survive_an_outage(server, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = server.uri
    # As `tune.parent.open_parent` opens a sweep's parent run, then its outbox.
    run_id = tracking.open_run(
        tmp_path / "sweep_run.json",
        uri,
        "outbox-test",
        "sweep",
        {"sweep.kind": "parent"},
        "panet tune",
        "unknown",
    )
    box = tracking.open_outbox(tmp_path, uri, run_id, "driver", Settings(30.0, 0.5))
    assert box is not None and box.root == tmp_path / "mlflow-outbox"
    tracking.log_params(uri, run_id, {"sweep.name": "demo", "sweep.trials": 3})
    tracking.log_metrics(uri, run_id, {"trials_finished": 0}, 0)
    client = MlflowClient(uri)
    wait_for(lambda: "trials_finished" in client.get_run(run_id).data.metrics, 20, "step 0")

    server.stop()
    t0 = time.perf_counter()
    for step in range(1, 6):
        tracking.log_metrics(uri, run_id, {"trials_finished": step}, step)
    tracking.log_dict(uri, run_id, {"rows": [1, 2]}, "results/results.json")
    tracking.set_tags(uri, run_id, {"sweep.best_trial": "rbl"})
    tracking.log_params(uri, run_id, {"best.trial": "rbl"})
    tracking.finish_run(uri, run_id, "FINISHED")
    assert time.perf_counter() - t0 < 2.0, "logging waited for the stopped server"
    wait_for(lambda: box.failing_since is not None, 20, "the sender to find the server down")
    left = undelivered(box.root)[(uri, run_id)]
    assert left["metrics"] == 5 and left["artifact"] == 1 and left["status FINISHED"] == 1

    server.start()
    assert box.close() is None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "trials_finished")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(6)]
    assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    assert run.data.params == {"sweep.name": "demo", "sweep.trials": "3", "best.trial": "rbl"}
    assert run.data.tags["sweep.best_trial"] == "rbl"
    path = client.download_artifacts(run_id, "results/results.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == {"rows": [1, 2]}
    (j,) = journals(box.root)
    assert j.acked == len(j.read()) == 11
    assert not (box.root / "files" / j.name).exists() or not any(
        (box.root / "files").rglob("*.json")
    )

    # A later driver of the same run (a resumed job) delivers nothing twice: the run's end
    # from the first is superseded, its own ends the run again.
    again = tracking.open_outbox(tmp_path, uri, run_id, "driver", Settings(30.0, 0.5))
    tracking.log_metrics(uri, run_id, {"trials_finished": 6}, 6)
    tracking.finish_run(uri, run_id, "FINISHED")
    assert again.close() is None
    steps = [m.step for m in client.get_metric_history(run_id, "trials_finished")]
    assert steps == list(range(7))


def test_refused_record_is_kept_and_not_retried(server, tmp_path) -> None:
    missing = "0" * 32  # no such run: the server answers 404
    box = tracking.open_outbox(tmp_path, server.uri, missing, "driver", Settings(10.0, 0.5))
    with pytest.warns(RuntimeWarning, match="MLflow refused a metrics record of run 0000"):
        tracking.log_metrics(server.uri, missing, {"loss": 1.0}, 1)
        assert box.close() is None
    (j,) = journals(box.root)
    rejected = (box.root / f"{j.name}.rejected").read_text().splitlines()
    assert len(rejected) == 1 and json.loads(rejected[0])["kind"] == "metrics"
    assert "RESOURCE_DOES_NOT_EXIST" in json.loads(rejected[0])["error"]
    assert sync(box.root, timeout_s=5.0) is None


def test_a_server_away_holds_up_only_its_own_journals(server, tmp_path) -> None:
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("outbox-two-servers")
    run_id = client.create_run(experiment).info.run_id
    # A journal left by an earlier job for a server that is gone (nothing listens on port 9).
    old = Journal.create(tmp_path / "mlflow-outbox", "http://127.0.0.1:9", "f" * 32, "driver")
    old.append("metrics", {"metrics": [["loss", 1.0, 1, 1]]})
    old.close()
    box = tracking.open_outbox(tmp_path, server.uri, run_id, "driver", Settings(3.0, 0.5))
    tracking.log_metrics(server.uri, run_id, {"loss": 0.5}, 1)
    tracking.finish_run(server.uri, run_id, "FINISHED")
    left = box.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.5}
    assert left is not None and "run ffffffff" in left and "http://127.0.0.1:9" in left
    assert f"run {run_id}" not in left


def test_records_logged_during_a_pass_are_delivered_by_close(mlflow_uri, tmp_path) -> None:
    """`close` right after the last records: the sender, busy with an artifact when they came,
    takes them too (a pass that began before `close` does not end the sender)."""
    run_id = tracking.open_run(
        tmp_path / "run.json", mlflow_uri, "outbox-close", "close", {}, "panet tune", "unknown"
    )
    box = tracking.open_outbox(tmp_path, mlflow_uri, run_id, "driver", Settings(60.0, 0.5))
    big = tmp_path / "results.bin"
    big.write_bytes(bytes(8 << 20))  # an upload that outlasts the calls below
    for i in range(3):
        tracking.log_artifact_file(mlflow_uri, run_id, big, f"results/{i}")
    tracking.set_tags(mlflow_uri, run_id, {"sweep.best_trial": "good"})
    tracking.finish_run(mlflow_uri, run_id, "FINISHED")
    assert box.close() is None
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sweep.best_trial"] == "good"
