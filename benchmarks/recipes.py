"""Which training recipe learns the synthetic set fastest? Held-out AP after a step budget.

Each recipe is the demo config (`jobs/configs/tiny_synth.yaml`) plus `--set`-style overrides,
trained from scratch for `--steps` steps in one process, without Ray: the same model,
augmentation (`augment_table`, seeded by epoch), batching (`iter_train_batches` with the
config's `group_window`), optimizer, schedule and train step (`step.train_step`) as
`panet train`, on the demo's 600 training images; scored with pycocotools on the 80 held-out
validation images (`distributed.infer` + `scoring.score`) at each `--evals` step. Without
Ray's start-up it turns a recipe question into minutes, not a job per point.

    python benchmarks/recipes.py --steps 200 --evals 100,200 \\
        --recipe sgd solver.optimizer=sgd solver.base_lr=0.02 \\
        --recipe adamw solver.optimizer=adamw solver.base_lr=0.001 [--jobs 2]

`--jobs 2` trains two recipes at a time, one thread each (the same total work on 2 cores; the
AP does not depend on it, only the wall time). The last line is one JSON object:
{recipe: {step: [bbox AP, segm AP]}, "machine": {...}}.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from grouping import Rows  # benchmarks/ is on sys.path when run as a script
from machine import print_machine

DEFAULT_RECIPES = (
    ["sgd", "solver.optimizer=sgd", "solver.base_lr=0.02"],
    ["adamw", "solver.optimizer=adamw", "solver.base_lr=0.001"],
)


def train_batches(shards: Path, job: Any, labels: dict[int, int]) -> Any:
    """Endless training batches: each epoch in a seeded file order, augmented and grouped."""
    from pipeline.data.augment import augment_table
    from pipeline.data.batches import iter_train_batches
    from pipeline.data.manifest import iter_records, load_manifest
    from pipeline.data.reader import steps_per_epoch

    records = list(iter_records(shards))
    steps = steps_per_epoch(load_manifest(shards), job.solver.ims_per_batch)
    epoch = 0
    while True:
        order = np.random.default_rng((job.seed, epoch)).permutation(len(records))
        table = pa.Table.from_pylist([records[i] for i in order])
        rows = augment_table(table, job.augment(), job.seed, epoch, labels).to_pylist()
        yield from iter_train_batches(
            Rows(rows),
            job.solver.ims_per_batch,
            steps,
            group_window=job.data.group_window,
            seed=(job.seed, epoch, 0),
        )
        epoch += 1


def run_recipe(
    name: str,
    overrides: dict[str, Any],
    shards: dict[str, Path],
    steps: int,
    evals: list[int],
    threads: int,
) -> dict[str, Any]:
    """Train one recipe; {"curve": {step: (bbox AP, segm AP)}, "seconds": wall time}."""
    import torch

    from panet_model import build_panet
    from pipeline.config import load_job_config
    from pipeline.data.augment import decode_eval_record
    from pipeline.data.collate import collate_eval
    from pipeline.data.manifest import iter_records, load_manifest
    from pipeline.data.reader import inverse_label_map, label_map
    from pipeline.demo import CONFIG
    from pipeline.evaluate.distributed import infer
    from pipeline.evaluate.scoring import coco_ground_truth, score
    from pipeline.ray_session import use_worker_onednn_cache
    from pipeline.train.solver import build_optimizer, build_scheduler
    from pipeline.train.step import train_step

    torch.set_num_threads(threads)
    use_worker_onednn_cache()  # as a Ray worker (ray_session.worker_env)
    sets = {"data.train": str(shards["train"]), "data.val": str(shards["val"])}
    job = load_job_config(CONFIG, {**sets, **overrides, "solver.max_steps": steps})
    manifest = load_manifest(shards["train"])
    labels = label_map(manifest)
    val_rows = [decode_eval_record(r) for r in iter_records(shards["val"])]
    gt = coco_ground_truth(shards["val"])
    torch.manual_seed(job.seed)
    model = build_panet(job.model, num_classes=len(labels) + 1).train()
    optimizer = build_optimizer(model, job)
    scheduler = build_scheduler(optimizer, job)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    device = torch.device("cpu")
    batches = train_batches(shards["train"], job, labels)
    curve: dict[int, tuple[float, float]] = {}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        images, targets = next(batches)
        result = train_step(model, [(images, targets)], optimizer, scheduler, scaler, job, device)
        if result.bad is not None:
            raise FloatingPointError(f"recipe {name}: step {step}: {result.bad} is not finite")
        if step in evals:
            eval_batches = (
                collate_eval(val_rows[i : i + job.eval.batch_size])
                for i in range(0, len(val_rows), job.eval.batch_size)
            )
            results = infer(model, eval_batches, inverse_label_map(manifest), device)
            metrics = score(gt, results)
            curve[step] = (round(metrics["bbox/AP"], 3), round(metrics["segm/AP"], 3))
            print(
                f"[{name}] step {step}: bbox AP {curve[step][0]:.3f} segm AP {curve[step][1]:.3f}"
                f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return {"curve": curve, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--evals", default="", help="comma-separated steps (default: the last)")
    parser.add_argument(
        "--recipe",
        action="append",
        nargs="+",
        default=[],
        metavar="NAME KEY=VALUE",
        help="a name, then --set-style overrides of the demo config",
    )
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained at a time")
    parser.add_argument("--root", type=Path, default=Path("demo"), help="data set and shards")
    args = parser.parse_args()
    evals = sorted({int(s) for s in args.evals.split(",") if s} | {args.steps})
    if not 1 <= evals[0] <= evals[-1] == args.steps:
        parser.error(f"--evals: steps must be in 1..{args.steps}, got {args.evals}")

    from pipeline.config import load_job_config, parse_set
    from pipeline.demo import CONFIG, TRAIN_IMAGES, TRAIN_SEED, VAL_IMAGES, VAL_SEED, ensure_shards

    recipes = {}
    for name, *sets in args.recipe or DEFAULT_RECIPES:
        if name in recipes or "=" in name or name == "machine":
            parser.error(f"--recipe {name!r}: give each recipe a new name, then key=value items")
        try:  # a bad key fails here, before any training
            recipes[name] = parse_set(sets)
            load_job_config(CONFIG, {"data.train": ".", "data.val": ".", **recipes[name]})
        except ValueError as err:
            parser.error(f"--recipe {name}: {err}")
    machine = print_machine()
    t0 = time.perf_counter()
    root = args.root
    shards = {
        "train": ensure_shards(root / "raw", root / "shards", "train", TRAIN_IMAGES, TRAIN_SEED),
        "val": ensure_shards(root / "raw", root / "shards", "val", VAL_IMAGES, VAL_SEED),
    }
    threads = max(1, 2 // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            name: pool.submit(run_recipe, name, o, shards, args.steps, evals, threads)
            for name, o in recipes.items()
        }
        out = {name: f.result() for name, f in futures.items()}

    print(f"\n{args.steps} steps from scratch; held-out bbox AP / segm AP at each step")
    print("| recipe | " + " | ".join(str(s) for s in evals) + " | train s |")
    print("|---|" + "---|" * (len(evals) + 1))
    for name, r in out.items():
        cells = [f"{r['curve'][s][0]:.3f} / {r['curve'][s][1]:.3f}" for s in evals]
        print(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    print(
        f"\n{time.perf_counter() - t0:.0f} s, {args.jobs} recipe(s) at a time, {threads} thread(s)"
    )
    print(json.dumps({**{name: r["curve"] for name, r in out.items()}, "machine": machine}))


if __name__ == "__main__":
    main()
