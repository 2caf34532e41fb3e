"""How much does Ray Train cost over a plain PyTorch loop, and how does it scale?

Side by side in one run, on the `tiny` preset and the synthetic data set:
- a plain single-process loop over pre-decoded batches (1 thread, batch 2);
- the real `panet train` path (Ray Data reader + Ray Train, DDP, SyncBN) with 1 worker, batch 2;
- the same with 2 workers and the same global batch (1 image each).
Throughput and the data-wait fraction come from the job's own per-window metrics in MLflow,
after a warm-up.

    python benchmarks/train_throughput.py [--quick] [--steps N]

The last line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

WARMUP_WINDOWS = 2  # progress windows dropped before averaging (model build, first epoch)


def make_shards(root: Path, train: int, val: int) -> dict[str, Path]:
    from pipeline.demo import ensure_shards

    return {
        "train": ensure_shards(root / "raw", root / "shards", "train", train, 0),
        "val": ensure_shards(root / "raw", root / "shards", "val", val, 1),
    }


def plain_loop(shards: dict[str, Path], steps: int, batch: int, job: Any) -> float:
    """Images/s of a bare PyTorch loop: same model, optimizer and augmentation, pre-decoded."""
    from panet_model import build_panet
    from pipeline.data.augment import augment_record, record_rng
    from pipeline.data.collate import collate_train
    from pipeline.data.reader import label_map
    from pipeline.data.shards import iter_records, load_manifest
    from pipeline.solver import build_optimizer

    torch.set_num_threads(1)  # what one Ray Train worker with 1 CPU gets
    manifest = load_manifest(shards["train"])
    labels = label_map(manifest)
    aug = job.augment()
    rows = []
    for record in iter_records(shards["train"]):
        rng = record_rng(job.seed, 0, int(record["image_id"]))
        row = augment_record(record, aug, rng, labels)
        if row["valid"]:
            rows.append(row)
        if len(rows) >= batch * 8:
            break
    batches = [collate_train(rows[i : i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
    torch.manual_seed(0)
    model = build_panet(job.model, num_classes=len(labels) + 1).train()
    optimizer = build_optimizer(model, job)
    times = []
    for step in range(steps):
        images, targets = batches[step % len(batches)]
        t0 = time.perf_counter()
        losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = times[len(times) // 4 :]
    return batch / statistics.median(steady)


def ray_run(
    shards: dict[str, Path], storage: Path, workers: int, batch: int, steps: int, log_every: int
) -> dict[str, float]:
    """Run the real training job; read its steady-state throughput back from MLflow."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_job_config
    from pipeline.trainer import run_training

    job = load_job_config(
        Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_synth.yaml",
        {
            "name": f"throughput-{workers}w",
            "data.train": str(shards["train"]),
            "data.val": str(shards["val"]),
            "scaling.num_workers": workers,
            "solver.ims_per_batch": batch,
            "solver.max_steps": steps,
            "solver.warmup_steps": 1,
            "log_every": log_every,
            "checkpoint.every_steps": steps,
            "checkpoint.storage_path": str(storage),
            "eval.pictures": 0,
            "tracking.log_model": False,
        },
    )
    result = run_training(job)
    client = MlflowClient(result["tracking_uri"])

    def series(key: str) -> list[float]:
        history = sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)
        return [m.value for m in history][WARMUP_WINDOWS:]

    return {
        "images_per_s": statistics.median(series("train/images_per_s")),
        "data_wait_fraction": statistics.median(series("train/data_wait_fraction")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a few minutes here")
    parser.add_argument("--steps", type=int, default=None, help="training steps per Ray run")
    args = parser.parse_args()
    steps = args.steps or (40 if args.quick else 120)
    log_every = 5 if args.quick else 10
    batch = 2

    import ray

    from pipeline.config import load_job_config

    with tempfile.TemporaryDirectory(prefix="panet-throughput-") as tmp:
        root = Path(tmp)
        shards = make_shards(root, train=64, val=4)
        job = load_job_config(
            Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_synth.yaml",
            {"data.train": str(shards["train"]), "data.val": str(shards["val"])},
        )
        plain = plain_loop(shards, max(steps // 2, 12), batch, job)
        ray.init(num_cpus=4)
        try:
            one = ray_run(shards, root / "runs", 1, batch, steps, log_every)
            two = ray_run(shards, root / "runs", 2, batch, steps, log_every)
        finally:
            ray.shutdown()

    ratio = one["images_per_s"] / plain
    speedup = two["images_per_s"] / one["images_per_s"]
    rows = [
        ("plain PyTorch loop, 1 thread", plain, float("nan")),
        ("Ray Train, 1 worker", one["images_per_s"], one["data_wait_fraction"]),
        ("Ray Train, 2 workers", two["images_per_s"], two["data_wait_fraction"]),
    ]
    print(f"\ntiny preset, synthetic data, global batch {batch}, {steps} steps per Ray run")
    print(f"{'loop':<32}{'images/s':>10}{'data wait':>11}")
    for name, ips, wait in rows:
        wait_s = "-" if wait != wait else f"{100 * wait:.1f}%"
        print(f"{name:<32}{ips:>10.2f}{wait_s:>11}")
    print(f"Ray 1 worker / plain: {ratio:.3f} (target >= 0.9)")
    print(f"2 workers / 1 worker: {speedup:.2f}x, scaling efficiency {speedup / 2:.2f}")
    print(
        json.dumps(
            {
                "plain_images_per_s": round(plain, 3),
                "ray_1w_images_per_s": round(one["images_per_s"], 3),
                "ray_2w_images_per_s": round(two["images_per_s"], 3),
                "ray_vs_plain_ratio": round(ratio, 3),
                "data_wait_fraction": round(one["data_wait_fraction"], 4),
                "data_wait_fraction_2w": round(two["data_wait_fraction"], 4),
                "speedup_2w": round(speedup, 3),
                "scaling_efficiency_2w": round(speedup / 2, 3),
                "steps": steps,
            }
        )
    )


if __name__ == "__main__":
    main()
