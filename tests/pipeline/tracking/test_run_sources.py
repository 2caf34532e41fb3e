"""Every training run records its source and its data: the MLflow UI's "Source" and "Datasets"."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import load_job_config
from pipeline.demo import ensure_shards
from pipeline.tracking import git_commit
from pipeline.train.driver import open_run
from pipeline.train.preflight import preflight

REPO = Path(__file__).resolve().parents[3]


def test_open_run_logs_source_tags_and_dataset_inputs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train = ensure_shards(tmp_path / "raw", tmp_path / "shards", "train", 6, 0)
    val = ensure_shards(tmp_path / "raw", tmp_path / "shards", "val", 3, 1)
    job = load_job_config(
        REPO / "jobs" / "configs" / "tiny_synth.yaml",
        {
            "data.train": str(train),
            "data.val": str(val),
            "solver.ims_per_batch": 2,
            "checkpoint.storage_path": str(tmp_path / "runs"),
        },
    )
    plan = preflight(job)
    uri, run_id = open_run(job, plan)
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["mlflow.source.name"] == "panet train"
    assert run.data.tags["mlflow.source.type"] == "JOB"
    if git_commit() != "unknown":
        assert run.data.tags["mlflow.source.git.commit"] == git_commit()
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    manifest = json.loads((train / "manifest.json").read_text())
    assert inputs["train"].dataset.digest == manifest["fingerprint"][:36]
    assert json.loads(inputs["train"].dataset.source) == {"uri": train.resolve().as_uri()}
    assert json.loads(inputs["val"].dataset.profile) == {"num_rows": 3}
    contexts = {n: {t.key: t.value for t in d.tags} for n, d in inputs.items()}
    assert contexts["train"]["mlflow.data.context"] == "training"
    assert contexts["val"]["mlflow.data.context"] == "validation"

    # A resumed job logs into the same run, with the same datasets once.
    again = open_run(job, plan, tags={"extra": "1"})
    assert again == (uri, run_id)
    run = MlflowClient(uri).get_run(run_id)
    assert len(run.inputs.dataset_inputs) == 2 and run.data.tags["extra"] == "1"
