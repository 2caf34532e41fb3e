"""Does a train worker's host memory plateau over a long run?

Runs the real `panet train` path (Ray Data reader, Ray Train worker, periodic evaluation with
pycocotools, checkpoints, MLflow logging) on the `tiny` preset and a small synthetic set with
small images, so that a run of a few thousand steps crosses many epoch restarts and
evaluations. The worker logs its resident memory with every progress line
(`host/rss_anon_gb`: its own heap; `host/rss_shmem_gb`: pages of Ray's shared object store it
touched); the table shows them at the requested steps, read back from MLflow.

    python benchmarks/memory.py [--steps 1600] [--at 200,400,800,1600] [--workers 1]

The last line is one JSON object with the figures and the growth between the last two marks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from machine import print_machine  # benchmarks/ is on sys.path when run as a script
from train_throughput import make_shards

KEYS = ("host/rss_anon_gb", "host/rss_shmem_gb", "host/rss_file_gb")


def job_config(
    shards: dict[str, Path],
    storage: Path,
    workers: int,
    steps: int,
    every: int,
    size: int,
    pictures: int,
) -> Any:
    """The demo config with small images, evaluation and a checkpoint every `every` steps."""
    from pipeline.config import load_job_config

    return load_job_config(
        Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_synth.yaml",
        {
            "name": f"memory-{workers}w",
            "data.train": str(shards["train"]),
            "data.val": str(shards["val"]),
            "data.train_scales": [size],
            "data.scale_range": False,
            "data.max_size": size * 5 // 4,
            "scaling.num_workers": workers,
            "solver.ims_per_batch": 2 * workers,
            "solver.max_steps": steps,
            "solver.warmup_steps": 1,
            "log_every": 50,
            "checkpoint.every_steps": every,
            "checkpoint.storage_path": str(storage),
            "eval.every_steps": every,
            "eval.pictures": pictures,
            "tracking.log_model": False,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1600, help="training steps")
    parser.add_argument("--at", default="200,400,800,1600", help="steps to report")
    parser.add_argument("--workers", type=int, default=1, help="train workers")
    parser.add_argument("--image-size", type=int, default=128, help="shorter side in training")
    parser.add_argument("--train-images", type=int, default=64, help="images per epoch")
    parser.add_argument("--pictures", type=int, default=4, help="pictures per evaluation")
    args = parser.parse_args()
    marks = [int(s) for s in args.at.split(",")]
    machine = print_machine()

    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import run_training

    with tempfile.TemporaryDirectory(prefix="panet-memory-") as tmp:
        root = Path(tmp)
        shards = make_shards(root, train=args.train_images, val=8)
        job = job_config(
            shards,
            root / "runs",
            args.workers,
            args.steps,
            marks[0],
            args.image_size,
            args.pictures,
        )
        ray.init(num_cpus=args.workers + 2)
        try:
            result = run_training(job)
        finally:
            ray.shutdown()
        client = MlflowClient(result["tracking_uri"])
        series = {
            k: {m.step: m.value for m in client.get_metric_history(result["run_id"], k)}
            for k in KEYS
        }

    def at(key: str, step: int) -> float:
        logged = series[key]
        nearest = min(logged, key=lambda s: abs(s - step)) if logged else None
        return logged[nearest] if nearest is not None else float("nan")

    print(
        f"\ntiny preset, {args.workers} worker(s), images {args.image_size}px, evaluation with "
        f"{args.pictures} pictures every {marks[0]} steps; rank 0's resident memory"
    )
    print(f"{'step':>6}{'anon GB':>10}{'shmem GB':>10}{'file GB':>10}")
    rows = {}
    for step in marks:
        anon, shmem, file = (at(k, step) for k in KEYS)
        rows[step] = {"anon_gb": round(anon, 3), "shmem_gb": round(shmem, 3)}
        print(f"{step:>6}{anon:>10.3f}{shmem:>10.3f}{file:>10.3f}")
    last, before = rows[marks[-1]], rows[marks[-2]]
    growth = last["anon_gb"] - before["anon_gb"]
    print(f"anon growth {marks[-2]} -> {marks[-1]}: {growth:+.3f} GB")
    print(
        json.dumps(
            {
                "steps": args.steps,
                "workers": args.workers,
                "image_size": args.image_size,
                "rss": {str(k): v for k, v in rows.items()},
                "anon_growth_last_gb": round(growth, 3),
                "machine": machine,
            }
        )
    )


if __name__ == "__main__":
    main()
