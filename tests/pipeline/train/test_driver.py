"""The training job end to end on a real local Ray cluster and a real MLflow server.

2 CPU workers with SyncBN over gloo, checkpoints, periodic evaluation, MLflow read back through
`MlflowClient`; resume of a finished or extended job; recovery after a worker is killed; bad
configs failing before any worker starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load_job_config
from pipeline.train.driver import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"


@pytest.fixture(scope="module")
def cluster() -> None:
    """One local Ray instance for the module, with CPUs for 2 workers plus Ray Data."""
    ray.init(num_cpus=4, include_dashboard=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(mlflow_uri: str) -> str:
    return mlflow_uri  # the session's server (tests/conftest.py)


def job_for(shards: dict[str, Path], storage: Path, **sets):
    base = {
        "name": "test-job",
        "data.train": str(shards["train"]),
        "data.val": str(shards["val"]),
        "solver.max_steps": 6,
        "solver.warmup_steps": 2,
        "solver.schedule": "step",  # the paper's schedule here; the demo config runs linear
        "solver.decay_steps": [5],
        "checkpoint.every_steps": 3,
        "eval.every_steps": 3,
        "eval.pictures": 2,
        "log_every": 2,
        "checkpoint.storage_path": str(storage),
        "tracking.experiment": "test-driver",  # the session's server: this module's own runs
    }
    return load_job_config(CONFIG, {**base, **sets})


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_two_worker_syncbn_run_logs_everything(cluster, shards, server, tmp_path, capsys) -> None:
    job = job_for(shards, tmp_path, **{"tracking.uri": server})
    assert job.model.backbone.norm == "syncbn" and job.scaling.num_workers == 2
    result = run_training(job)

    # Checkpoints: the latest and the best, with everything a resume needs.
    ckpts = sorted((tmp_path / "test-job").glob("step-*/state.pt"))
    assert [p.parent.name for p in ckpts] == ["step-00000003", "step-00000006"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["step"] == 6 and state["mlflow_run_id"] == result["run_id"]
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "config"} <= set(state)

    client = MlflowClient(server)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.afp.fusion"] == "max" and params["model.backbone.norm"] == "syncbn"
    assert params["world_size"] == "2" and params["version.torch"] == torch.__version__
    assert params["version.ray"] == ray.__version__ and params["data.manifest_id"]
    assert "git_commit" in params
    metrics = run.data.metrics
    for iou in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert f"{iou}/{name}" in metrics
    for key in (
        "train/loss",
        "train/loss_mask",
        "train/lr",
        "train/images_per_s",
        "train/data_wait_fraction",
    ):
        assert metric_steps(client, run.info.run_id, key) == [2, 4, 6]
    assert metric_steps(client, run.info.run_id, "segm/AP") == [3, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "predictions", "level_share"} <= artifacts
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert pictures == [
        "predictions/predictions_step00000003.png",
        "predictions/predictions_step00000006.png",
    ]
    charts = [a.path for a in client.list_artifacts(run.info.run_id, "level_share")]
    assert "level_share/level_share_step00000006.png" in charts
    # The final model loads back by its URI and equals the checkpoint's weights.
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    loaded = tracking.load_weights(server, f"models:/{models[0].model_id}")
    assert loaded is not None and loaded.keys() == state["model"].keys()
    for key, value in state["model"].items():
        torch.testing.assert_close(loaded[key], value)
    assert set(result["metrics"]) >= {"bbox/AP", "segm/AP"}

    # Re-running the finished job resumes (nothing left to train, no worker started) and
    # reuses the run.
    capsys.readouterr()
    again = run_training(job)
    assert "is already trained to step 6" in capsys.readouterr().out
    assert again["run_id"] == result["run_id"]
    assert again["checkpoint"] == result["checkpoint"]
    assert again["metrics"] == pytest.approx(result["metrics"], nan_ok=True)
    experiment = client.get_experiment_by_name(job.tracking.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 1
    # (A job extended with more steps trains on in the same run: test_storage.py, on S3.)


def train_workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_killed_worker_recovers_from_the_last_checkpoint(cluster, shards, tmp_path) -> None:
    job = job_for(
        shards,
        tmp_path,
        **{
            "name": "kill-job",
            "solver.max_steps": 12,
            "checkpoint.every_steps": 4,
            "eval.every_steps": 0,
        },
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(job)), daemon=True)
    thread.start()
    first = tmp_path / "kill-job" / "step-00000004" / "state.pt"
    deadline = time.monotonic() + 600
    while not first.exists():
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.5)
    victims = train_workers()
    assert victims, "no train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive()
    result = outcome["result"]
    state = torch.load(tmp_path / "kill-job" / "step-00000012" / "state.pt", weights_only=True)
    assert state["step"] == 12
    client = MlflowClient(result["tracking_uri"])
    # One run; its loss curve is continuous up to the last step (steps after the checkpoint
    # may be logged twice: once before the kill, once after the restart).
    steps = sorted(set(metric_steps(client, result["run_id"], "train/loss")))
    assert steps == [2, 4, 6, 8, 10, 12]
    experiment = client.get_experiment_by_name(job.tracking.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 1
    record = json.loads((tmp_path / "kill-job" / "mlflow_run.json").read_text())
    assert record["run_id"] == result["run_id"] == state["mlflow_run_id"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"solver.max_stepz": 3}, "solver.max_stepz"),
        ({"solver.max_steps": "many"}, "solver.max_steps"),
        ({"data.train": "/nonexistent/shards"}, "data.train"),
        ({"scaling.num_workers": 8, "solver.ims_per_batch": 8}, "scaling.num_workers"),
        ({"solver.ims_per_batch": 64, "scaling.num_workers": 2}, "solver.ims_per_batch"),
    ],
)
def test_bad_config_fails_before_any_worker(cluster, shards, tmp_path, sets, message) -> None:
    before = set(train_workers())
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run_training(job_for(shards, tmp_path, **sets))
    assert set(train_workers()) <= before
    assert not list(tmp_path.glob("*/step-*")), "no checkpoint may be written"
