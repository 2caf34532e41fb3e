"""What does a Tune sweep cost beyond its training runs?

The same three trials (the tiny preset on a small synthetic data set, 2 workers each) run once as
three sequential `panet train` jobs (`run_training`) and once as one 3-trial sweep
(`run_sweep`), on one local Ray cluster with its dashboard. Reported: each run's wall time, its
start-up (from its MLflow run's creation to its first logged training step, with
`log_every: 1`), the sweep's overhead per trial, and the ratio of the sweep's total to the sum
of the sequential runs (target <= 1.15).

    python benchmarks/sweep.py [--steps N] [--images N]

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

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"


def sweep_yaml(path: Path) -> Path:
    """Three trials that differ in a way that costs the same: the learning rate."""
    path.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "variants": [
                    {"name": f"lr{i}", "set": {"solver.base_lr": lr}}
                    for i, lr in enumerate((0.003, 0.002, 0.001))
                ],
            }
        )
    )
    return path


def startup_s(uri: str, run_id: str) -> float:
    """From the run's creation to its first training metric (step 1, `log_every: 1`)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    first = min(m.timestamp for m in client.get_metric_history(run_id, "train/loss"))
    return (first - run.info.start_time) / 1000


def run_time_s(uri: str, run_id: str) -> float:
    """From the run's creation to its end."""
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    return (run.info.end_time - run.info.start_time) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps a trial")
    parser.add_argument("--images", type=int, default=48, help="training images")
    args = parser.parse_args()

    import ray

    from pipeline.config import load_job_config
    from pipeline.demo import ensure_shards
    from pipeline.tracking import runs as tracking
    from pipeline.train.driver import run_training
    from pipeline.tune.runner import prepare, run_sweep, start_local_ray
    from pipeline.tune.sweep import base_job, expand, load_sweep

    root = Path(tempfile.mkdtemp(prefix="panet-bench-sweep-"))
    train = ensure_shards(root / "raw", root / "shards", "train", args.images, 0)
    val = ensure_shards(root / "raw", root / "shards", "val", 8, 1)
    sets: dict[str, Any] = {
        "data.train": str(train),
        "data.val": str(val),
        "solver.max_steps": args.steps,
        "solver.warmup_steps": 0,
        "eval.every_steps": 0,  # one evaluation, at the end
        "checkpoint.every_steps": args.steps,
        "log_every": 1,
        "data.train_scales": [160, 192],
        "data.max_size": 256,
        "eval.pictures": 1,
        "tracking.log_model": False,
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    sweep = load_sweep(str(sweep_yaml(root / "bench.yaml")))
    job, base = base_job(CONFIG, {**sets, "checkpoint.storage_path": str(root / "sweep")})
    prepared = prepare(sweep, expand(sweep), job, base)
    start_local_ray(num_cpus=4)

    sequential: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for trial in prepared.trials:
        flat = {**base, **trial.overrides, **sets}
        flat.update({"name": f"seq-{trial.name}", "checkpoint.storage_path": str(root / "seq")})
        t = time.perf_counter()
        result = run_training(load_job_config(None, flat))
        sequential.append(
            {
                "wall_s": time.perf_counter() - t,
                "startup_s": startup_s(result["tracking_uri"], result["run_id"]),
            }
        )
    sequential_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = run_sweep(prepared)
    sweep_s = time.perf_counter() - t0
    uri = out["tracking_uri"]
    kids = tracking.child_runs(uri, out["parent_run_id"])
    trials = [
        {"run_s": run_time_s(uri, r.info.run_id), "startup_s": startup_s(uri, r.info.run_id)}
        for r in kids
    ]
    ray.shutdown()

    n = len(prepared.trials)
    print(f"\n3 trials x {args.steps} steps, tiny preset, 2 workers, {args.images} images")
    print(f"{'':<28}{'total s':>10}{'per run s':>12}{'start-up s':>12}")
    seq_start = statistics.median(r["startup_s"] for r in sequential)
    trial_start = statistics.median(r["startup_s"] for r in trials)
    print(f"{'sequential panet train':<28}{sequential_s:>10.1f}{sequential_s / n:>12.1f}"
          f"{seq_start:>12.1f}")  # fmt: skip
    print(f"{'one 3-trial sweep':<28}{sweep_s:>10.1f}{sweep_s / n:>12.1f}{trial_start:>12.1f}")
    ratio = sweep_s / sequential_s
    overhead = (sweep_s - sequential_s) / n
    print(f"sweep / sequential: {ratio:.3f} (target <= 1.15); overhead a trial {overhead:+.1f} s")
    result = {
        "trials": n,
        "steps": args.steps,
        "sequential_s": round(sequential_s, 1),
        "sweep_s": round(sweep_s, 1),
        "sweep_vs_sequential_ratio": round(ratio, 3),
        "tune_overhead_per_trial_s": round(overhead, 1),
        "trial_startup_s": round(trial_start, 1),
        "train_startup_s": round(seq_start, 1),
        "trial_run_s": [round(t["run_s"], 1) for t in trials],
        "sequential_run_s": [round(r["wall_s"], 1) for r in sequential],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
