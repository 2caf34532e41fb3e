"""Worker setup errors that would repeat on every retry fail a run once, with their message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.failures import FAILED_FILE, clear_failure, raise_failure, setup_or_none

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"


def test_setup_or_none_reports_input_errors_and_passes_others(tmp_path: Path) -> None:
    failed = tmp_path / "job" / FAILED_FILE
    device = torch.device("cpu")
    assert setup_or_none(lambda: 7, failed, device) == 7 and not failed.exists()

    def missing() -> int:
        raise FileNotFoundError("weights file '/models/r50.pth' does not exist")

    assert setup_or_none(missing, failed, device) is None
    assert json.loads(failed.read_text()) == {
        "error": "weights file '/models/r50.pth' does not exist"
    }
    with pytest.raises(ValueError, match=r"^weights file '/models/r50.pth' does not exist$"):
        raise_failure(failed)
    assert not failed.exists()
    raise_failure(failed)  # nothing to raise
    failed.write_text("{}")
    clear_failure(failed)
    assert not failed.exists()

    def crash() -> int:
        raise RuntimeError("CUDA error: an illegal memory access")  # may not repeat: Ray retries

    with pytest.raises(RuntimeError):
        setup_or_none(crash, failed, device)


@pytest.mark.ray
@pytest.mark.slow
def test_a_missing_weights_file_fails_once_not_per_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file vanishes after the driver's check: the workers fail once, the run is FAILED."""
    import ray
    from mlflow import MlflowClient

    from pipeline.config import load_job_config
    from pipeline.demo import ensure_shards
    from pipeline.train import driver, preflight

    sets = {
        "name": "no-weights",
        "data.train": str(ensure_shards(tmp_path / "raw", tmp_path / "shards", "train", 4, 0)),
        "data.val": str(ensure_shards(tmp_path / "raw", tmp_path / "shards", "val", 2, 1)),
        "checkpoint.storage_path": str(tmp_path / "runs"),
        "model.backbone.weights": str(tmp_path / "gone.pth"),
        "scaling.num_workers": 1,
        "solver.ims_per_batch": 2,
        "ray.max_failures": 3,
    }
    job = load_job_config(CONFIG, sets)
    monkeypatch.setattr(preflight, "check_weights", lambda *_: None)
    ray.init(num_cpus=3)
    try:
        with pytest.raises(ValueError, match=r"^weights file .*gone\.pth' does not exist$"):
            driver.run_training(job)
    finally:
        ray.shutdown()
    record = json.loads((job.run_dir / driver.RUN_RECORD).read_text())
    run = MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    assert run.info.status == "FAILED"
    assert not (job.run_dir / FAILED_FILE).exists()
