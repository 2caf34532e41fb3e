"""Shared by the data pipeline benchmarks (`data_convert.py`, `data_bytes.py`, `data_supply.py`,
`data_ray.py`): their settings, synthetic COCO sets, the records in memory, timed decode +
augment chunks, a training worker's step, augment and train steps side by side, and how
figures go into the last-line JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from machine import print_machine  # benchmarks/ is on sys.path when run as a script

from panet_model import PANetConfig, build_panet
from pipeline.data.augment import AugmentConfig, augment_record, augment_table, record_rng
from pipeline.data.collate import collate_train
from pipeline.data.convert_coco import convert_coco
from pipeline.data.manifest import load_manifest, shard_paths
from pipeline.data.reader import label_map
from pipeline.data.synth import write_synthetic

MB = 2**20
MAP_BATCH = 16  # records per augment_table call: reader.TRAIN_MAP_BATCH
TINY_CLASSES = 6  # the synthetic set's 5 shape classes + background
R50_CLASSES = 81  # COCO's 80 + background: the R-50 job's head sizes
R50_SHORT = (512, 800)  # short sides of the two images of the R-50 train batch
LARGE_SHARD_SIZE = 32  # rows per shard of the 640..1024 px set: ~5 MB of JPEGs
# CPUs a worker node gives the decode pipeline per training worker, for the "node" ratios:
# jobs/configs/coco_panet_r50.yaml asks cpus_per_worker: 6, one of which runs the train loop;
# tiny_synth.yaml gives each worker 1 CPU and decode tasks share what is left (none on 2 CPUs).
NODE_DECODE_CPUS = {"tiny": 1, "r50": 5}
GOAL = 3.0


@dataclass(frozen=True)
class Settings:
    small: tuple[int, int]  # 160..320 px images converted: the smaller and the larger set
    shard_size: int  # rows per shard of the 160..320 px sets
    large: int  # 640..1024 px images, for the R-50 decode rates
    tiny_rounds: int  # augment chunk / train steps alternations
    tiny_chunk: int  # records per tiny augment chunk
    tiny_steps: int  # tiny train steps per round
    r50_chunk: int  # records augment chunk
    r50_steps: int  # timed R-50 train steps, one per round; 0: none
    r50_warmup: int  # untimed R-50 steps before them


# Quick: shards of 64 so that both sets have >= 4 shards and so use the process pool.
QUICK = Settings((250, 500), 64, 48, 4, 64, 2, 16, 0, 0)
FULL = Settings((1000, 5000), 256, 256, 8, 128, 3, 32, 2, 1)


def settings(description: str, quick_help: str) -> Settings:
    """The command line every data benchmark takes: `--quick` and `--r50-steps N`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--r50-steps", type=int, default=None, help="timed R-50 train steps (quick 0, full 2)"
    )
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    if args.r50_steps is not None:
        s = Settings(**{**s.__dict__, "r50_steps": args.r50_steps})
    return s


def main(doc: str, quick_help: str, run: Callable[[Path, Settings], dict[str, Any]]) -> None:
    """A data benchmark's command: its machine line, `run` in a temp dir (removed at the end),
    the total time and, last, one JSON line with `run`'s figures and the machine."""
    s = settings(doc.split("\n\n")[0], quick_help)
    machine = print_machine()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="panet-bench-"))
    try:
        result = {"quick": s == QUICK, **run(tmp, s)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine
    print(f"\n(total {result['elapsed_s']:.0f} s)")
    print(json.dumps(result))


def log(msg: str) -> None:
    print(
        f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True
    )


def rounded(value: Any, digits: int | None) -> Any:
    """`round(value, digits)`; None stays None, and digits None keeps the value as it is."""
    if value is None or digits is None:
        return value
    return round(value, digits) if digits else round(value)


def figures(prefix: str, source: Mapping[str, Any], digits: Mapping[str, int | None]) -> dict:
    """The JSON figures `{prefix + name: source[name] rounded to digits[name]}`."""
    return {f"{prefix}{name}": rounded(source[name], d) for name, d in digits.items()}


def fmt_opt(v: float | None, spec: str, width: int, unit: str = "") -> str:
    """A table cell: "-" for a figure this run did not measure."""
    text = "-" if v is None else f"{v:{spec}}{unit}"
    return f"{text:>{width}}"


# ---------------------------------------------------------------------------------------------
# Synthetic sets


@dataclass(frozen=True)
class CocoSet:
    images: Path  # the image folder
    annotations: Path  # instances_train.json


def synthetic_sets(tmp: Path, s: Settings) -> tuple[CocoSet, CocoSet]:
    """`s.small[1]` images of 160..320 px and `s.large` of 640..1024 px, in COCO layout."""
    log(f"synthetic data: {s.small[1]} images of 160..320 px, {s.large} of 640..1024 px ...")
    small = write_synthetic("coco", s.small[1], 0, tmp / "raw_small")
    large = write_synthetic("coco", s.large, 1, tmp / "raw_large", min_size=640, max_size=1024)
    return tuple(  # type: ignore[return-value]
        CocoSet(raw / "images" / "train", raw / "annotations" / "instances_train.json")
        for raw in (small, large)
    )


def converted_sets(tmp: Path, s: Settings) -> list[tuple[CocoSet, Path]]:
    """The two synthetic sets and their shards, converted in this process: 160..320 px first."""
    out = []
    for raw, name, shard_size in zip(
        synthetic_sets(tmp, s), ("small", "large"), (s.shard_size, LARGE_SHARD_SIZE)
    ):
        log(f"converting the {name} set ...")
        shard_dir = tmp / f"shards_{name}"
        convert_coco(raw.annotations, raw.images, shard_dir, shard_size=shard_size, progress=False)
        out.append((raw, shard_dir))
    return out


# ---------------------------------------------------------------------------------------------
# Plain decode + augment, side by side with train steps


class Records:
    """Every record of a shard directory in memory, handed out in chunks, cycling."""

    def __init__(self, shard_dir: Path) -> None:
        manifest = load_manifest(shard_dir)
        tables = [pq.read_table(p) for p in shard_paths(manifest, shard_dir)]
        self.table = pa.concat_tables(tables).combine_chunks()
        self.labels = label_map(manifest)
        self.offset = 0
        self.epoch = 0

    def chunk(self, n: int) -> Any:
        parts, left = [], n
        while left:
            take = min(left, self.table.num_rows - self.offset)
            parts.append(self.table.slice(self.offset, take))
            self.offset += take
            left -= take
            if self.offset == self.table.num_rows:
                self.offset = 0
                self.epoch += 1  # the next pass draws new scales and flips
        return pa.concat_tables(parts)


@dataclass
class Timed:
    wall: float
    cpu: float  # CPU time of the timing thread
    images: int

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.images / self.cpu


def augment_chunk(records: Records, n: int, aug: Any) -> tuple[Timed, list[dict]]:
    """Decode + augment `n` records, `MAP_BATCH` a call; returns the timing and the valid rows."""
    table = records.chunk(n)
    epoch = records.epoch
    out = []
    wall = cpu = 0.0
    for start in range(0, table.num_rows, MAP_BATCH):
        batch = table.slice(start, MAP_BATCH)
        t0, c0 = time.perf_counter(), time.thread_time()
        out.append(augment_table(batch, aug, 0, epoch, records.labels))
        wall += time.perf_counter() - t0
        cpu += time.thread_time() - c0
    rows = [r for t in out for r in t.to_pylist() if r["valid"]]
    return Timed(wall, cpu, table.num_rows), rows


class Trainer:
    """One training worker's step: forward, backward, clip, SGD (as `step.train_step`)."""

    def __init__(self, cfg: Any, num_classes: int, threads: int) -> None:
        self.threads = threads
        torch.manual_seed(0)
        self.model = build_panet(cfg, num_classes=num_classes)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=1e-4, momentum=0.9)

    def step(self, batch: tuple[list, list]) -> Timed:
        torch.set_num_threads(self.threads)
        images, targets = batch
        t0, c0 = time.perf_counter(), time.thread_time()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model(images, targets)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.optimizer.step()
        return Timed(time.perf_counter() - t0, time.thread_time() - c0, len(images))


def train_rate(steps: list[Timed]) -> float:
    return sum(s.images for s in steps) / sum(s.wall for s in steps)


@dataclass
class SideBySide:
    """c0, S1, c1, ..., SR, cR: augment chunks and (groups of) train steps, alternating."""

    chunks: list[Timed]
    steps: list[list[Timed]]  # S_r ran between chunks r - 1 and r

    @property
    def aug_rate(self) -> float:
        return statistics.median(c.rate for c in self.chunks)

    @property
    def aug_cpu_rate(self) -> float:
        return statistics.median(c.cpu_rate for c in self.chunks)

    @property
    def train_rate(self) -> float | None:
        return statistics.median(train_rate(st) for st in self.steps) if self.steps else None

    @property
    def step_s(self) -> float | None:
        walls = [t.wall for st in self.steps for t in st]
        return statistics.median(walls) if walls else None

    @property
    def supply(self) -> float | None:
        """Median over rounds of: mean augment rate of the chunks either side / train rate."""
        ratios = [
            (self.chunks[r - 1].rate + self.chunks[r].rate) / 2 / train_rate(st)
            for r, st in enumerate(self.steps, start=1)
        ]
        return statistics.median(ratios) if ratios else None

    @property
    def supply_cpu(self) -> float | None:
        """The same in CPU time of the one thread doing the work (single-threaded runs only)."""
        ratios = [
            (self.chunks[r - 1].cpu_rate + self.chunks[r].cpu_rate)
            / 2
            / (sum(t.images for t in st) / sum(t.cpu for t in st))
            for r, st in enumerate(self.steps, start=1)
        ]
        return statistics.median(ratios) if ratios else None


def side_by_side(
    records: Records,
    chunk: int,
    aug: Any,
    rounds: int,
    train: Callable[[list[dict]], list[Timed]],
    name: str,
) -> SideBySide:
    """Alternate augment chunks and train steps; `train` gets the rows just augmented."""
    timed, rows = augment_chunk(records, chunk, aug)
    result = SideBySide([timed], [])
    for r in range(rounds):
        result.steps.append(train(rows))
        timed, rows = augment_chunk(records, chunk, aug)
        result.chunks.append(timed)
        log(
            f"  {name} round {r + 1}/{rounds}: augment {timed.rate:.1f} img/s, "
            f"train {train_rate(result.steps[-1]):.3f} img/s"
        )
    return result


def tiny_augment() -> Any:
    return AugmentConfig(scales=(192, 256), scale_range=True, max_size=400)  # tiny_synth.yaml


def run_tiny(records: Records, s: Settings) -> SideBySide:
    aug = tiny_augment()
    cfg = PANetConfig.preset("tiny").override(
        {"transform.min_size": (256,), "transform.max_size": 400}
    )
    trainer = Trainer(cfg, TINY_CLASSES, threads=1)
    _, rows = augment_chunk(records, MAP_BATCH, aug)  # warm-up, untimed
    trainer.step(collate_train(rows[:2]))

    def train(rows: list[dict]) -> list[Timed]:
        return [trainer.step(collate_train(rows[2 * i : 2 * i + 2])) for i in range(s.tiny_steps)]

    return side_by_side(records, s.tiny_chunk, aug, s.tiny_rounds, train, "tiny")


def run_r50(records: Records, s: Settings) -> tuple[SideBySide, list[tuple[int, int]]]:
    aug = AugmentConfig.paper()
    augment_chunk(records, 4, aug)  # warm-up, untimed
    # The consumption batch: two records with instances, at the fixed short sides asked for.
    picked = [r for r in records.table.slice(0, 32).to_pylist() if r["annotations"]][:2]
    rows = [
        augment_record(
            r,
            AugmentConfig(scales=(short,), scale_range=False, max_size=1333, flip_prob=0.0),
            record_rng(0, 0, int(r["image_id"])),
            records.labels,
        )
        for r, short in zip(picked, R50_SHORT)
    ]
    sizes = [(int(r["height"]), int(r["width"])) for r in rows]
    if not s.r50_steps:
        return side_by_side(records, s.r50_chunk, aug, 0, lambda _: [], "R-50"), sizes
    batch = collate_train(rows)
    trainer = Trainer(PANetConfig.preset("panet"), R50_CLASSES, threads=2)
    for i in range(s.r50_warmup):
        log(f"  R-50 warm-up step {i + 1}: {trainer.step(batch).wall:.1f} s")

    def train(_: list[dict]) -> list[Timed]:
        return [trainer.step(batch)]

    return side_by_side(records, s.r50_chunk, aug, s.r50_steps, train, "R-50"), sizes
