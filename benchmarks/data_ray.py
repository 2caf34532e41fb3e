"""Ray Data end to end: how close does `build_train_dataset(...).iter_batches` come to the plain
decode + augment function, per CPU, and how many training workers does it feed?

On synthetic COCO sets converted in a temp dir (removed at the end), on a local
`ray.init(num_cpus=os.cpu_count())`: images/s in total and per CPU, images per CPU-second used
by the whole Ray process tree, both against the plain function (`augment_table` on one CPU)
measured just before and after the pass; supply = images/s per CPU / images/s one training
worker consumes (its train steps measured first, as in `data_supply.py`).

    python benchmarks/data_ray.py [--quick] [--r50-steps N]

--quick: smaller sets and no R-50 train step (`--r50-steps 1` adds a cold one); the full run:
one warm-up and two timed R-50 steps. The last line is one JSON object with the figures and
ratios.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray
from data_bench import (  # benchmarks/ is on sys.path when run as a script
    MAP_BATCH,
    Records,
    Settings,
    augment_chunk,
    converted_sets,
    figures,
    fmt_opt,
    log,
    main,
    rounded,
    run_r50,
    run_tiny,
    tiny_augment,
)
from procstat import tree_cpu_seconds
from ray.data import DataContext

from pipeline.data.augment import AugmentConfig
from pipeline.data.reader import build_train_dataset

QUICK_HELP = "small sets, no R-50 step"
# The JSON figures of each set's pass, under the set's prefix: name -> digits.
PASS_FIGURES = {
    "tiny": {
        "images": None,
        "images_per_s": 1,
        "per_cpu": 1,
        "steady_images_per_s": 1,
        "first_batch_s": 2,
        "images_per_cpu_s": 1,
        "efficiency": 3,
        "cpu_efficiency": 3,
    },
    "r50": {
        "images": None,
        "images_per_s": 2,
        "per_cpu": 2,
        "images_per_cpu_s": 2,
        "efficiency": 3,
        "cpu_efficiency": 3,
    },
}
PREFIX = {"tiny": "ray_data_", "r50": "ray_data_r50_"}
# ... under the names they have always had in the JSON.
FIGURE_NAMES = {
    "per_cpu": "images_per_s_per_cpu",
    "efficiency": "efficiency_vs_plain",
    "cpu_efficiency": "cpu_efficiency_vs_plain",
}


def ray_pass(shard_dir: Path, aug: Any) -> dict[str, Any]:
    """One pass of the training dataset through `iter_batches`: wall time and CPU time."""
    ds = build_train_dataset(str(shard_dir), aug, epoch=1, seed=0)
    n = valid = batches = 0
    first = 0.0
    n_first = 0
    cpu0, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
    for batch in ds.iter_batches(batch_size=MAP_BATCH, batch_format="pyarrow", prefetch_batches=2):
        if not first:
            first, n_first = time.perf_counter(), batch.num_rows
        n += batch.num_rows
        batches += 1
        valid += sum(batch.column("valid").to_pylist())
    end, cpu1 = time.perf_counter(), tree_cpu_seconds(os.getpid())
    return {
        "images": n,
        "valid": valid,
        "seconds": end - t0,
        "images_per_s": n / (end - t0),
        "first_batch_s": first - t0,
        # Too few batches after the first one say nothing about a steady rate.
        "steady_images_per_s": (n - n_first) / (end - first) if batches >= 5 else None,
        "cpu_s": cpu1 - cpu0,
        "images_per_cpu_s": n / (cpu1 - cpu0),
    }


def run_ray(tmp: Path, sets: dict[str, tuple[Path, Any, int]], cpus: int) -> dict[str, Any]:
    """A pass over each set on a fresh local Ray, between two plain augment chunks."""
    records = {name: Records(shard_dir) for name, (shard_dir, _, _) in sets.items()}
    ray.init(
        address="local",  # never join someone else's cluster on this machine
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=2 * 1024**3,
        _temp_dir=str(tmp / "ray"),
    )
    try:
        DataContext.get_current().enable_progress_bars = False
        # Warm-up: start the Ray workers and import the decode code in them.
        shard_dir, aug, _ = sets["tiny"]
        warm = build_train_dataset(str(shard_dir), aug, seed=0).limit(4 * MAP_BATCH)
        for _ in warm.iter_batches(batch_size=MAP_BATCH, batch_format="pyarrow"):
            pass
        out: dict[str, Any] = {}
        for name, (shard_dir, aug, chunk) in sets.items():
            before, _ = augment_chunk(records[name], chunk, aug)
            log(f"Ray Data pass over the {name} set ...")
            result = ray_pass(shard_dir, aug)
            after, _ = augment_chunk(records[name], chunk, aug)
            result["plain_per_cpu"] = (before.rate + after.rate) / 2
            result["plain_per_cpu_s"] = (before.cpu_rate + after.cpu_rate) / 2
            result["per_cpu"] = result["images_per_s"] / cpus
            result["efficiency"] = result["per_cpu"] / result["plain_per_cpu"]
            result["cpu_efficiency"] = result["images_per_cpu_s"] / result["plain_per_cpu_s"]
            out[name] = result
        return out
    finally:
        ray.shutdown()


def print_ray(ray_res: dict[str, Any], cpus: int) -> None:
    print(
        f"\nRay Data end to end: build_train_dataset(...).iter_batches, local Ray with {cpus} "
        "CPUs, after a warm-up pass"
    )
    header = (
        f"{'set':<6}{'images':>7}{'s':>7}{'1st batch':>10}{'img/s':>8}{'steady':>8}"
        f"{'img/s/CPU':>10}{'plain':>8}{'eff':>6}{'img/CPU-s':>10}{'plain':>8}{'eff':>6}"
        f"{'supply':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, r in ray_res.items():
        print(
            f"{name:<6}{r['images']:>7}{r['seconds']:>7.1f}{r['first_batch_s']:>10.1f}"
            f"{r['images_per_s']:>8.1f}{fmt_opt(r['steady_images_per_s'], '.1f', 8)}"
            f"{r['per_cpu']:>10.1f}{r['plain_per_cpu']:>8.1f}{r['efficiency']:>6.2f}"
            f"{r['images_per_cpu_s']:>10.1f}{r['plain_per_cpu_s']:>8.1f}"
            f"{r['cpu_efficiency']:>6.2f}{fmt_opt(r['supply'], '.1f', 9, 'x')}"
        )
    print(
        "img/s: whole pass, first-batch latency included; steady: after the first batch (>= 5 "
        "batches only)\nplain: augment_table on one CPU just before and after the pass; eff = "
        "Ray / plain\nimg/CPU-s: images per CPU-second of this process tree (driver + every Ray "
        "process) during the pass\nsupply = img/s/CPU / train img/s of one worker (its steps run "
        "before the pass, as in data_supply.py; not side by side)"
    )


def pass_figures(name: str, result: dict[str, Any]) -> dict[str, Any]:
    named = {FIGURE_NAMES.get(k, k): result[k] for k in PASS_FIGURES[name]}
    digits = {FIGURE_NAMES.get(k, k): d for k, d in PASS_FIGURES[name].items()}
    return figures(PREFIX[name], named, digits)


def run(tmp: Path, s: Settings) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    (_, small_dir), (_, large_dir) = converted_sets(tmp, s)
    log("what one training worker consumes: tiny, then R-50 ...")
    consumption = {
        "tiny": run_tiny(Records(small_dir), s).train_rate,
        "r50": run_r50(Records(large_dir), s)[0].train_rate,
    }
    log(f"Ray Data on a local ray.init(num_cpus={cpus}) ...")
    sets = {
        "tiny": (small_dir, tiny_augment(), s.tiny_chunk),
        "r50": (large_dir, AugmentConfig.paper(), s.r50_chunk),
    }
    ray_res = run_ray(tmp, sets, cpus)
    for name, r in ray_res.items():
        cons = consumption[name]
        r["supply"] = None if cons is None else r["per_cpu"] / cons
    print_ray(ray_res, cpus)
    return {
        "cpus": cpus,
        "ray_data_num_cpus": cpus,
        **pass_figures("tiny", ray_res["tiny"]),
        **pass_figures("r50", ray_res["r50"]),
        "supply_ratio_vs_tiny_ray_data": rounded(ray_res["tiny"]["supply"], 2),
        "supply_ratio_vs_r50_ray_data": rounded(ray_res["r50"]["supply"], 1),
    }


if __name__ == "__main__":
    main(__doc__, QUICK_HELP, run)
