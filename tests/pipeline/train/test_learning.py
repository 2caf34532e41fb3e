"""Learning: the `tiny` preset learns the synthetic data set within a fixed step budget.

The data, model and recipe of `make demo` (600 training and 80 held-out validation images of
other seeds, 4 images a step, AdamW at lr 0.003 decaying linearly to zero, class-agnostic box
regression, 300 steps), scored with pycocotools on the held-out images; then `panet eval`
scores the job directory's latest checkpoint on 2 workers with each test-time trick (flip,
multi-scale), which must not lower segm AP. (That a 2-worker `panet eval`
reproduces the training's own evaluation is checked in tests/pipeline/train/test_storage.py; the
model's forward with both tricks, in tests/panet_model/test_tta.py.)

The demo trains on 2 workers with SyncBN, 2 images each. This test trains the same global
batch of 4 on 1 worker with 2 CPUs: SyncBN over 2 ranks computes exactly the batch norm of the
concatenated batch (tests/panet_model/test_norm.py), so the optimization is the same, and on
this 2-core machine one 2-thread worker runs it ~1.2x faster than two 1-thread workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from pipeline.cli import main as cli_main
from pipeline.config import load_job_config
from pipeline.demo import CONFIG, TRAIN_IMAGES, TRAIN_SEED, VAL_IMAGES, VAL_SEED, ensure_shards
from pipeline.evaluate.scoring import IOU_TYPES, METRIC_NAMES
from pipeline.train.driver import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The demo's budget: with `data.preserve_order` (the default) the test trains on the same
# batches every run, so on one kind of CPU it ends at the same metrics every time (README,
# "Results"; the demo's 2 workers reach bbox / segm 0.362 / 0.414); another CPU's kernels round
# differently and may land a little elsewhere, hence the margin. A longer linear schedule ends
# higher (650 steps: 0.526 / 0.552; `benchmarks/recipes.py`).
MIN_SEGM_AP, MIN_BBOX_AP = 0.38, 0.33
STEPS = 300
# Flip and multi-scale testing around the test scale 256 (`panet eval --set model.test.*`).
TRICKS = {
    "flip": ["model.test.flip=true"],
    "multi-scale": ["model.test.scales=[224,256,288]"],
}


def parse_table(text: str) -> dict[str, float]:
    """The metrics of `format_metrics`' table, e.g. {"bbox/AP": 0.52, ...}."""
    out = {}
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] in IOU_TYPES and len(cells) == len(METRIC_NAMES) + 1:
            out.update({f"{cells[0]}/{m}": float(v) for m, v in zip(METRIC_NAMES, cells[1:])})
    return out


def test_tiny_learns_the_synthetic_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = ensure_shards(tmp_path / "raw", tmp_path / "shards", "train", TRAIN_IMAGES, TRAIN_SEED)
    val = ensure_shards(tmp_path / "raw", tmp_path / "shards", "val", VAL_IMAGES, VAL_SEED)
    job = load_job_config(
        CONFIG,
        {
            "data.train": str(train),
            "data.val": str(val),
            "checkpoint.storage_path": str(tmp_path / "runs"),
            "solver.max_steps": STEPS,
            "scaling.num_workers": 1,
            "scaling.cpus_per_worker": 2,
            "eval.every_steps": 0,  # only at the end
            "checkpoint.every_steps": STEPS,  # only at the end (tests/pipeline/train/test_driver.py)
            "eval.pictures": 0,
            "tracking.log_model": False,
        },
    )
    ray.init(num_cpus=4)
    try:
        result = run_training(job)
        final = tmp_path / "runs" / job.name / f"step-{job.solver.max_steps:08d}"
        capsys.readouterr()
        # On the job directory: its latest checkpoint, said so.
        evaluate = ["eval", "--checkpoint", str(final.parent), "--data", str(val)]
        evaluate += ["--workers", "2", "--batch-size", str(job.eval.batch_size)]
        # The paper's test-time tricks (Sec. 4.2) through the distributed evaluation.
        tricks = {}
        for name, sets in TRICKS.items():
            assert cli_main([*evaluate, *(a for s in sets for a in ("--set", s))]) == 0, name
            out = capsys.readouterr().out
            assert f"{final.name} (latest of 1 in " in out, out[-2000:]
            tricks[name] = parse_table(out)
    finally:
        ray.shutdown()
    metrics = result["metrics"]
    print(f"learning: {metrics}")
    assert metrics["segm/AP"] >= MIN_SEGM_AP, metrics
    assert metrics["bbox/AP"] >= MIN_BBOX_AP, metrics

    with capsys.disabled():
        print(f"\n[tta] AP of {final.name} on the {VAL_IMAGES} validation images (bbox, segm):")
        for name, t in {"plain": metrics, **tricks}.items():
            print(f"[tta]   {name:<12} {t['bbox/AP']:.3f}  {t['segm/AP']:.3f}")
    for name, t in tricks.items():
        assert set(t) == {f"{i}/{m}" for i in IOU_TYPES for m in METRIC_NAMES}, (name, t)
        moved = [k for k in t if abs(t[k] - metrics[k]) > 0.003]  # beyond the table's rounding
        assert moved, f"{name}: the metrics of plain inference (switch not applied?)"
        assert t["segm/AP"] >= metrics["segm/AP"], (name, t["segm/AP"], metrics["segm/AP"])
