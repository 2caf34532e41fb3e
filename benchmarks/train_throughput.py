"""How much does Ray Train cost over a plain PyTorch loop, and how does it scale?

Side by side in one run, on the `tiny` preset and the synthetic data set:
- a plain single-process loop doing the worker's work (the same rows, batching, collation in a
  background thread, train step and schedule) without Ray (1 thread, batch 2);
- the real `panet train` path (Ray Data reader + Ray Train, DDP, SyncBN) with 1 worker, batch 2;
- the same with 2 workers and the same global batch (1 image each).
Every run trains one epoch of a synthetic set of `steps x 2` images (steady state: no epoch
restart). Throughput is per progress window, after the same warm-up windows in every run; the
Ray runs' figures and data-wait fraction come from the job's own metrics in MLflow.

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
from machine import print_machine  # benchmarks/ is on sys.path when run as a script

WARMUP_WINDOWS = 2  # progress windows dropped before averaging (model build, first epoch)


def make_shards(root: Path, train: int, val: int) -> dict[str, Path]:
    from pipeline.demo import ensure_shards

    return {
        "train": ensure_shards(root / "raw", root / "shards", "train", train, 0),
        "val": ensure_shards(root / "raw", root / "shards", "val", val, 1),
    }


def epoch_rows(shards: Path, job: Any, labels: dict[int, int], epochs: int) -> list[list[dict]]:
    """Each epoch's augmented rows in the job's seeded order: what Ray Data hands a worker."""
    import numpy as np
    import pyarrow as pa

    from pipeline.data.augment import augment_table
    from pipeline.data.manifest import iter_records

    records = list(iter_records(shards))
    out = []
    for epoch in range(epochs):
        order = np.random.default_rng((job.seed, epoch)).permutation(len(records))
        table = pa.Table.from_pylist([records[i] for i in order])
        out.append(augment_table(table, job.augment(), job.seed, epoch, labels).to_pylist())
    return out


def plain_loop(shards: dict[str, Path], job: Any, log_every: int) -> dict[str, float]:
    """Images/s and data-wait share of a bare single-process loop doing the worker's work.

    The rows Ray Data would deliver (every training image, augmented, in the job's seeded
    order) are made before the clock starts; in the loop, batches are grouped, collated and
    their masks decoded as on a worker (`iter_train_batches` in a background thread, uint8
    images converted on the device), and each step is the job's `train_step`, on as
    many threads as a Ray worker gets. Throughput and the share of time spent waiting for the
    next batch are measured per progress window; the same warm-up windows are dropped as for
    the Ray runs.
    """
    from grouping import Rows  # benchmarks/ is on sys.path when run as a script

    from pipeline.data.batches import in_background, iter_train_batches
    from pipeline.data.manifest import load_manifest
    from pipeline.data.reader import label_map, steps_per_epoch
    from pipeline.ray_session import use_worker_onednn_cache
    from pipeline.train.loop import build_training
    from pipeline.train.step import train_step

    torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))  # as a Ray worker
    use_worker_onednn_cache()  # as a Ray worker (ray_session.worker_env)
    manifest = load_manifest(shards["train"])
    labels = label_map(manifest)
    steps, batch = job.solver.max_steps, job.solver.ims_per_batch
    per_epoch = steps_per_epoch(manifest, batch)
    rows = epoch_rows(shards["train"], job, labels, -(-steps // per_epoch))
    torch.manual_seed(job.seed)
    device = torch.device("cpu")
    model, optimizer, scheduler, scaler = build_training(job, len(labels) + 1, device)
    model.train()
    rates, waits = [], []
    step, start, waited = 0, time.perf_counter(), 0.0
    for epoch, stream in enumerate(rows):
        n = min(per_epoch, steps - step)
        batches = iter_train_batches(
            Rows(stream),
            batch,
            n,
            group_window=job.data.group_window,
            seed=(job.seed, epoch, 0),
            image_dtype=torch.uint8,
        )
        prepared = in_background(batches)
        while True:
            t0 = time.perf_counter()
            item = next(prepared, None)
            waited += time.perf_counter() - t0
            if item is None:
                break
            train_step(model, [item], optimizer, scheduler, scaler, job, device)
            step += 1
            if step % log_every == 0:
                now = time.perf_counter()
                rates.append(log_every * batch / (now - start))
                waits.append(waited / (now - start))
                start, waited = now, 0.0
    return {
        "images_per_s": statistics.median(rates[WARMUP_WINDOWS:]),
        "data_wait_fraction": statistics.median(waits[WARMUP_WINDOWS:]),
    }


def job_config(
    shards: dict[str, Path], storage: Path, workers: int, batch: int, steps: int, log_every: int
) -> Any:
    """The demo config, sized for a throughput run: evaluation only at the end."""
    from pipeline.config import load_job_config

    return load_job_config(
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
            "eval.every_steps": 0,
            "eval.pictures": 0,
            "tracking.log_model": False,
        },
    )


def ray_run(
    shards: dict[str, Path], storage: Path, workers: int, batch: int, steps: int, log_every: int
) -> dict[str, float]:
    """Run the real training job; read its steady-state throughput back from MLflow."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import run_training

    job = job_config(shards, storage, workers, batch, steps, log_every)
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
    machine = print_machine()

    import ray

    with tempfile.TemporaryDirectory(prefix="panet-throughput-") as tmp:
        root = Path(tmp)
        # One epoch per run: a steady state without an epoch restart (docs/design.md).
        shards = make_shards(root, train=steps * batch, val=4)
        job = job_config(shards, root / "plain", 1, batch, steps, log_every)
        plain_run = plain_loop(shards, job, log_every)
        plain = plain_run["images_per_s"]
        print(f"[plain] {plain:.3f} images/s", flush=True)
        ray.init(num_cpus=4)
        try:
            one = ray_run(shards, root / "runs", 1, batch, steps, log_every)
            two = ray_run(shards, root / "runs", 2, batch, steps, log_every)
        finally:
            ray.shutdown()

    ratio = one["images_per_s"] / plain
    speedup = two["images_per_s"] / one["images_per_s"]
    rows = [
        ("plain PyTorch loop, 1 thread", plain, plain_run["data_wait_fraction"]),
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
                "plain_data_wait_fraction": round(plain_run["data_wait_fraction"], 4),
                "ray_1w_images_per_s": round(one["images_per_s"], 3),
                "ray_2w_images_per_s": round(two["images_per_s"], 3),
                "ray_vs_plain_ratio": round(ratio, 3),
                "data_wait_fraction": round(one["data_wait_fraction"], 4),
                "data_wait_fraction_2w": round(two["data_wait_fraction"], 4),
                "speedup_2w": round(speedup, 3),
                "scaling_efficiency_2w": round(speedup / 2, 3),
                "steps": steps,
                "machine": machine,
            }
        )
    )


if __name__ == "__main__":
    main()
