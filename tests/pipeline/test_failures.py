"""Worker setup errors that would repeat on every retry fail a run once, with their message."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.failures import result_box, setup_or_none, take_answer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module: CPUs for a 1-worker job and its data tasks."""
    import ray

    ray.init(num_cpus=3)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_setup_errors_reach_the_driver_through_its_result_box(local_ray: None) -> None:
    """A worker's input error goes into the driver's actor (any node reaches it), the first one
    wins, and the driver raises it; other errors are Ray's to retry and put nothing."""
    import ray

    device = torch.device("cpu")
    box = result_box()
    assert setup_or_none(lambda: 7, box, device) == 7
    assert take_answer(box) == {}

    def missing() -> int:
        raise FileNotFoundError("weights file '/models/r50.pth' does not exist")

    box = result_box()
    assert setup_or_none(missing, box, device) is None
    ray.get(box.put.remote("error", "a later rank's error"))
    with pytest.raises(ValueError, match=r"^weights file '/models/r50.pth' does not exist$"):
        take_answer(box)
    # Freed once read: `ray.kill` is asynchronous, so a call right after it may still be served.
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get(box.get.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the box still answers 30 s after it was read"
        time.sleep(0.2)

    def crash() -> int:
        raise RuntimeError("CUDA error: an illegal memory access")  # may not repeat: Ray retries

    box = result_box()
    with pytest.raises(RuntimeError):
        setup_or_none(crash, box, device)
    ray.get(box.put.remote("metrics", {"segm/AP": 0.5}))  # `panet eval`'s answer
    assert take_answer(box) == {"metrics": {"segm/AP": 0.5}}


@pytest.mark.ray
@pytest.mark.slow
def test_a_missing_weights_file_fails_once_not_per_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_ray: None
) -> None:
    """The file vanishes after the driver's check: the workers fail once, the run is FAILED."""
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
    with pytest.raises(ValueError, match=r"^weights file .*gone\.pth' does not exist$"):
        driver.run_training(job)
    record = json.loads((job.run_dir / driver.RUN_RECORD).read_text())
    run = MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    assert run.info.status == "FAILED"
