"""Learning: the `tiny` preset learns the synthetic data set within a fixed step budget.

The same data and config as `make demo` (600 training and 80 held-out validation images of
other seeds, 2 workers with SyncBN), scored with pycocotools on the held-out images.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from pipeline.config import load_job_config
from pipeline.demo import CONFIG, TRAIN_IMAGES, TRAIN_SEED, VAL_IMAGES, VAL_SEED, ensure_shards
from pipeline.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The demo config (600 steps of 4 images) reached bbox AP 0.456 / segm AP 0.489 here (AP curve in
# the README). These floors leave room for run-to-run noise; the target of 0.5 for both
# is not reached yet on this budget (issue 4 stays open for it).
MIN_SEGM_AP = 0.45
MIN_BBOX_AP = 0.40


def test_tiny_learns_the_synthetic_set(tmp_path: Path) -> None:
    train = ensure_shards(tmp_path / "raw", tmp_path / "shards", "train", TRAIN_IMAGES, TRAIN_SEED)
    val = ensure_shards(tmp_path / "raw", tmp_path / "shards", "val", VAL_IMAGES, VAL_SEED)
    job = load_job_config(
        CONFIG,
        {
            "data.train": str(train),
            "data.val": str(val),
            "checkpoint.storage_path": str(tmp_path / "runs"),
            "eval.pictures": 0,
            "tracking.log_model": False,
        },
    )
    ray.init(num_cpus=4)
    try:
        result = run_training(job)
    finally:
        ray.shutdown()
    metrics = result["metrics"]
    print(f"learning: {metrics}")
    assert metrics["segm/AP"] >= MIN_SEGM_AP, metrics
    assert metrics["bbox/AP"] >= MIN_BBOX_AP, metrics
