"""Object storage: URIs stay URIs, shards and checkpoints on an S3-compatible server.

The server is moto's server mode on localhost; every client (pyarrow, Ray Data, Ray Train,
boto3) finds it through the standard AWS environment variables.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.cli import main as panet
from pipeline.config import load_job_config
from pipeline.data.manifest import load_manifest, shard_paths
from pipeline.data.synth import write_synthetic
from pipeline.state_file import load_state
from pipeline.train.checkpoints import latest_state_file
from tests.s3_server import s3_server

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server with bucket `panet`; this process's AWS variables point at it."""
    with s3_server(tmp_path_factory.mktemp("s3")) as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


@pytest.fixture(scope="module")
def s3_shards(s3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Synthetic COCO splits converted straight to S3 with `panet data convert coco --out`."""
    raw = tmp_path_factory.mktemp("raw")
    out = {}
    for split, images, seed in (("train", 16, 0), ("val", 6, 1)):
        write_synthetic("coco", images, seed, raw / split, split=split)
        uri = f"s3://panet/data/{split}"
        code = panet(
            [
                "data",
                "convert",
                "coco",
                "--annotations",
                str(raw / split / "annotations" / f"instances_{split}.json"),
                "--images",
                str(raw / split / "images" / split),
                "--out",
                uri,
                "--shard-size",
                "8",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        assert code == 0
        out[split] = uri
    return out


def test_storage_uris_stay_uris_in_the_config() -> None:
    job = load_job_config(
        CONFIG,
        {
            "data.train": "s3://bucket/shards/train",
            "data.val": "gs://bucket/shards/val",
            "checkpoint.storage_path": "s3://bucket/runs",
        },
    )
    assert job.data.train == "s3://bucket/shards/train" and job.data.val == "gs://bucket/shards/val"
    assert job.checkpoint.storage_path == "s3://bucket/runs"
    assert str(job.run_dir) == "s3://bucket/runs/tiny-synth"
    assert str(job.run_dir / "step-00000002") == "s3://bucket/runs/tiny-synth/step-00000002"
    local = load_job_config(CONFIG, {"checkpoint.storage_path": "runs"})
    assert local.run_dir == Path("runs").resolve() / "tiny-synth"


def test_files_and_globs_on_s3(s3) -> None:
    run_dir = storage.as_path("s3://panet/unit/job")
    assert not run_dir.exists() and latest_state_file(run_dir) is None
    seal = {"files": {"state.pt": {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}}}
    for step in (2, 10, 12):
        (run_dir / f"step-{step:08d}" / "state.pt").write_bytes(b"x")
        if step != 12:  # no seal: not whole (an upload that stopped half-way)
            (run_dir / f"step-{step:08d}" / "checkpoint.json").write_text(json.dumps(seal))
    (run_dir / "step-00000011" / "metrics.json").write_text("{}")  # no state: not a checkpoint
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": "r"}))
    assert run_dir.is_dir() and (run_dir / "mlflow_run.json").is_file()
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == {"run_id": "r"}
    assert str(latest_state_file(run_dir)) == "s3://panet/unit/job/step-00000010/state.pt"
    assert storage.list_names("s3://panet/unit/job")[-1] == "step-00000012"
    storage.delete("s3://panet/unit/job")
    assert not storage.exists("s3://panet/unit/job/mlflow_run.json")


def test_convert_writes_shards_to_s3_and_inspect_reads_them(s3_shards, capsys) -> None:
    manifest = load_manifest(s3_shards["train"])
    assert sum(s["rows"] for s in manifest["shards"]) == 16 and len(manifest["shards"]) == 2
    paths = shard_paths(manifest, s3_shards["train"])
    assert all(p.startswith("s3://panet/data/train/") for p in paths)
    capsys.readouterr()
    assert panet(["data", "inspect", s3_shards["train"], "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["records"] == 16 and report["bytes_on_disk"] > 0
    assert not report["problems"]
    # A prefix with no manifest is not a shard set.
    assert panet(["data", "inspect", "s3://panet/data/missing"]) != 0


def test_default_sqlite_store_is_refused_for_object_storage(s3_shards) -> None:
    from pipeline.train.preflight import preflight

    job = load_job_config(
        CONFIG,
        {
            "data.train": s3_shards["train"],
            "data.val": s3_shards["val"],
            "checkpoint.storage_path": "s3://panet/runs",
            "tracking.uri": "",
        },
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with pytest.raises(ValueError, match="tracking.uri"):
        preflight(job)


@pytest.mark.ray
@pytest.mark.slow
def test_train_resume_and_eval_on_s3(s3_shards, mlflow_uri: str) -> None:
    """Shards and checkpoints on S3: train; resume from the S3 checkpoint before a corrupt one;
    eval the last."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate.job import run_eval_job
    from pipeline.train.driver import run_training

    sets = {
        "name": "s3-job",
        "data.train": s3_shards["train"],
        "data.val": s3_shards["val"],
        "data.train_scales": [128, 160],
        "data.max_size": 200,
        "solver.max_steps": 4,
        "solver.warmup_steps": 1,
        "checkpoint.every_steps": 2,
        "eval.every_steps": 0,
        "eval.pictures": 0,
        "log_every": 1,
        "checkpoint.storage_path": "s3://panet/runs",
        "tracking.log_model": False,
        "tracking.experiment": "test-storage",
    }
    ray.init(num_cpus=4)
    try:
        sets["tracking.uri"] = server = mlflow_uri
        first = run_training(load_job_config(CONFIG, sets))
        assert first["checkpoint"] == "s3://panet/runs/s3-job/step-00000004"
        assert storage.is_file("s3://panet/runs/s3-job/step-00000002/state.pt")
        assert set(first["metrics"]) >= {"segm/AP", "bbox/AP"}
        # Step 4's state.pt cut at half: the re-run resumes from the S3 checkpoint of step 2
        # into the same MLflow run and trains on to step 6.
        cut = first["checkpoint"] + "/state.pt"
        data = storage.read_bytes(cut)
        storage.write_bytes(cut, data[: len(data) // 2])
        second = run_training(load_job_config(CONFIG, {**sets, "solver.max_steps": 6}))
        assert second["checkpoint"] == "s3://panet/runs/s3-job/step-00000006"
        assert second["run_id"] == first["run_id"]
        assert load_state(second["checkpoint"])["step"] == 6
        # Steps 3 and 4 twice: trained on from step 2, not from the cut step 4.
        history = MlflowClient(server).get_metric_history(first["run_id"], "train/loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 3, 4, 4, 5, 6]
        metrics = run_eval_job(second["checkpoint"], s3_shards["val"], 2, 2)
        assert len(metrics) == 12 and metrics == pytest.approx(second["metrics"])
    finally:
        ray.shutdown()
