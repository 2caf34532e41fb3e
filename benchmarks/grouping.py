"""What does grouping batches by orientation and size (`data.group_window`) save?

A batch is padded to its largest height and width (and up to a multiple of 32) before the
backbone, so mixed landscape/portrait and small/large images waste compute. On the demo's
synthetic training set, augmented as `make demo` does (MST 192..256, max 400), this takes the
same rows in stream order and batches them as `iter_train_batches` does, with grouping off
(`group_window 1`) and on (windows of 2..16 steps), and reports:

1. padding: padded pixels / image pixels, over every batch of the first `--images` rows;
2. time: `tiny` train steps (forward, backward, SGD; 2 threads, batch 4 as in the learning
   test) on ungrouped and grouped batches, alternating one with the other so that both see
   the same machine load; the ratio is grouped / ungrouped seconds per image.

    python benchmarks/grouping.py [--quick] [--steps N]

The last line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from machine import print_machine  # benchmarks/ is on sys.path when run as a script

WINDOWS = (1, 2, 4, 8, 16)
SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform pads to a multiple of this


class Rows:
    """A list of augmented rows as the one-table stand-in for a Ray DataIterator."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.table = pa.Table.from_pylist(rows)

    def iter_batches(self, batch_size: int, batch_format: str, prefetch_batches: int) -> Any:
        for i in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(i, batch_size)


def augmented_rows(shards: Path, n: int, job: Any) -> tuple[list[dict[str, Any]], int]:
    """The first `n` records decoded and augmented as the reader does; and the class count."""
    from pipeline.data.augment import augment_table
    from pipeline.data.manifest import iter_records, load_manifest
    from pipeline.data.reader import label_map

    labels = label_map(load_manifest(shards))
    records = []
    for record in iter_records(shards):
        records.append(record)
        if len(records) == n:
            break
    table = pa.Table.from_pylist(records)
    rows = augment_table(table, job.augment(), job.seed, 0, labels).to_pylist()
    return [r for r in rows if r["valid"]], len(labels)


def batches(rows: list[dict[str, Any]], batch: int, window: int) -> list[tuple[list, list]]:
    from pipeline.data.batches import iter_train_batches

    steps = len(rows) // batch
    return list(iter_train_batches(Rows(rows), batch, steps, group_window=window, seed=0))


def padding(bs: list[tuple[list, list]]) -> float:
    """Padded pixels / image pixels over the batches."""

    def up(v: int) -> int:
        return math.ceil(v / SIZE_DIVISIBLE) * SIZE_DIVISIBLE

    real = sum(i.shape[1] * i.shape[2] for images, _ in bs for i in images)
    padded = sum(
        len(images) * up(max(i.shape[1] for i in images)) * up(max(i.shape[2] for i in images))
        for images, _ in bs
    )
    return padded / real


def make_step(job: Any, num_classes: int, threads: int) -> Callable[[tuple[list, list]], float]:
    """A function timing one tiny train step (forward, backward, optimizer) on a batch, in s."""
    import torch

    from panet_model import build_panet
    from pipeline.ray_session import use_worker_onednn_cache
    from pipeline.train.solver import build_optimizer

    use_worker_onednn_cache()  # as the train workers run
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_panet(job.model, num_classes=num_classes + 1).train()  # + background
    optimizer = build_optimizer(model, job)

    def step(batch: tuple[list, list]) -> float:
        images, targets = batch
        t0 = time.perf_counter()
        losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def step_times(
    job: Any, num_classes: int, plain: list, grouped: list, steps: int, threads: int
) -> dict[str, float]:
    """Seconds per image of train steps on each batch list, alternating plain and grouped."""
    step = make_step(job, num_classes, threads)
    step(plain[0])  # warm-up
    times: dict[str, list[float]] = {"plain": [], "grouped": []}
    for k in range(steps):
        for name, bs in (("plain", plain), ("grouped", grouped)):
            batch = bs[k % len(bs)]
            times[name].append(step(batch) / len(batch[0]))  # per image
    return {name: statistics.mean(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps")
    parser.add_argument("--images", type=int, default=None, help="rows batched (default 512)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    n_images = args.images or (256 if args.quick else 512)
    steps = args.steps or (8 if args.quick else 24)
    machine = print_machine()

    from pipeline.config import load_job_config
    from pipeline.demo import CONFIG, TRAIN_IMAGES, TRAIN_SEED, ensure_shards

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = ensure_shards(
            Path(tmp) / "raw", Path(tmp) / "shards", "train", TRAIN_IMAGES, TRAIN_SEED
        )
        job = load_job_config(CONFIG, {"data.train": str(shards), "data.val": str(shards)})
        rows, num_classes = augmented_rows(shards, n_images, job)
    batch = job.solver.ims_per_batch
    pads = {w: padding(batches(rows, batch, w)) for w in WINDOWS}
    window = job.data.group_window
    times = step_times(
        job, num_classes, batches(rows, batch, 1), batches(rows, batch, window), steps, args.threads
    )
    ratio = times["grouped"] / times["plain"]

    print(f"\n{len(rows)} augmented demo images, batches of {batch}")
    print("| group_window | padded / image pixels | vs no grouping |")
    print("|---|---|---|")
    for w, p in pads.items():
        print(f"| {w}{' (default)' if w == window else ''} | {p:.3f} | {p / pads[1]:.3f} |")
    print(f"\ntiny train step, {args.threads} threads, {steps} steps each, interleaved")
    print("| batches | s / image | ratio |")
    print("|---|---|---|")
    print(f"| ungrouped | {times['plain']:.3f} | 1.000 |")
    print(f"| group_window {window} | {times['grouped']:.3f} | {ratio:.3f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    print(
        json.dumps(
            {
                "padding_ungrouped": round(pads[1], 4),
                "padding_grouped": round(pads[window], 4),
                "group_window": window,
                "step_time_ratio_grouped_vs_ungrouped": round(ratio, 4),
                "images": len(rows),
                "steps": steps,
                "machine": machine,
            }
        )
    )


if __name__ == "__main__":
    main()
