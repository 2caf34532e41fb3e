"""Can the data pipeline keep the trainers fed, in bounded memory and reasonable disk space?

On synthetic COCO data written to a temp dir (removed at the end):

1. Converter: throughput and peak memory of `convert_coco` (in a child process, with its
   default pool of `os.cpu_count()` workers) on N and on 2-5x N images, three interleaved runs
   of each. Peak memory is the sum of RSS (and of PSS, which counts shared library pages once)
   over the child's whole process tree, sampled from /proc every 50 ms; `wait4` adds the CPU
   time of the tree and the exact peak RSS of its largest single process. The ratio between
   the two sets shows whether memory grows with the number of images.
2. Bytes per image in the shards against the source files (JPEG + annotation JSON).
3. Decode + augment on one CPU (`augment_table`, 16 records a call as in `map_batches`, one
   thread, no Ray) side by side with the train step it must feed: `tiny` (batch 2 at the demo's
   192..256 px MST, 1 thread) and the R-50 `panet` preset (batch 2 at 512 and 800 px short
   side, 2 threads). Augment chunks and train steps alternate, and each step is compared with
   the mean of the chunks just before and after it: the machine is shared, so only ratios
   measured side by side mean much. supply ratio = decode images/s on ONE CPU / images/s one
   training worker consumes (goal: >= 3).
4. Ray Data end to end: `build_train_dataset(...).iter_batches` on a local
   `ray.init(num_cpus=os.cpu_count())`: images/s in total and per CPU, images per CPU-second
   used by the whole Ray process tree, both against the plain function measured just before
   and after the pass.

    python benchmarks/data_pipeline.py [--quick] [--r50-steps N]

--quick (< 3 min): 250 vs 500 images converted, 48 large images, and no R-50 train step (one
takes 30 s to 2 min here, depending on the load; `--r50-steps 1` adds a cold one). The full
run: 1,000 vs 5,000 images, 256 large images, one warm-up and two timed R-50 steps. The last
line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import print_machine  # benchmarks/ is on sys.path when run as a script

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
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
CONVERT_REPS = 3  # runs of each of the two small-image sets; median time, highest peak

# Run in a child interpreter with `-c`, so that its process tree (and spawn's re-import of
# __main__ in the pool workers) holds the converter only, not this script's imports.
_CONVERT_CHILD = """
import json, sys, time
from pipeline.data.convert_coco import convert_coco
t0 = time.perf_counter()
m = convert_coco(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=int(sys.argv[4]),
                 progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "records": m["totals"]["records"]}))
"""


@dataclass(frozen=True)
class Settings:
    small: tuple[int, int]  # 160..320 px images converted: the smaller and the larger set
    shard_size: int  # rows per shard of the 160..320 px sets
    large: int  # 640..1024 px images, for the R-50 decode rates
    tiny_rounds: int  # augment chunk / train steps alternations
    tiny_chunk: int  # records per tiny augment chunk
    tiny_steps: int  # tiny train steps per round
    r50_chunk: int  # records per R-50 augment chunk
    r50_steps: int  # timed R-50 train steps, one per round; 0: none
    r50_warmup: int  # untimed R-50 steps before them


# Quick: shards of 64 so that both sets have >= 4 shards and so use the process pool.
QUICK = Settings((250, 500), 64, 48, 4, 64, 2, 16, 0, 0)
FULL = Settings((1000, 5000), 256, 256, 8, 128, 3, 32, 2, 1)


def log(msg: str) -> None:
    print(f"[data_pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Process trees: memory and CPU time from /proc


def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat.rsplit(")", 1)[1].split()  # comm may hold spaces and parens; fields from state


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant (this kernel has no /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(_stat_fields(name)[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    pids = [root]
    for pid in pids:
        pids.extend(children.get(pid, []))
    return pids


def _rss_pss(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        pss = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0  # the process just ended


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of a process tree, reaped children included."""
    total = 0
    for pid in process_tree(root):
        try:
            f = _stat_fields(pid)
            total += sum(int(v) for v in f[11:15])  # utime, stime, cutime, cstime
        except (OSError, ValueError, IndexError):
            continue
    return total / TICK


class TreeMemory:
    """Samples the summed RSS and PSS of a process tree in a thread; keeps the peaks.

    Also the peak RSS of the root alone and of its descendants together (the pool workers).
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_root_rss = self.peak_children_rss = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [_rss_pss(p) for p in process_tree(self.root)]  # the root first
            self.peak_rss = max(self.peak_rss, sum(s[0] for s in sizes))
            self.peak_root_rss = max(self.peak_root_rss, sizes[0][0])
            self.peak_children_rss = max(self.peak_children_rss, sum(s[0] for s in sizes[1:]))
            self.peak_pss = max(self.peak_pss, sum(s[1] for s in sizes))
            self.max_procs = max(self.max_procs, sum(1 for s in sizes if s[0]))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# Converter and bytes on disk


def coco_subset(ann_file: Path, n: int, out: Path) -> Path:
    """The first `n` images of a COCO file and their annotations: `write_synthetic(n)`'s set."""
    doc = json.loads(ann_file.read_text())
    doc["images"] = doc["images"][:n]
    ids = {img["id"] for img in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in ids]
    out.write_text(json.dumps(doc, separators=(",", ":")))
    return out


def convert(ann: Path, images: Path, out: Path, shard_size: int) -> dict[str, Any]:
    """`convert_coco` in a child process: its time, and the peak memory of its process tree."""
    errors = out.with_name(out.name + ".stderr")
    with open(errors, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CONVERT_CHILD,
                str(ann),
                str(images),
                str(out),
                str(shard_size),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        mem = TreeMemory(proc.pid)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        # wait4, not wait: its rusage covers this child and its reaped pool workers only
        # (ru_maxrss: the largest single process), whatever ran before.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        mem.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed ({proc.returncode}):\n{errors.read_text()}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {
        "images": result["records"],
        "seconds": result["seconds"],
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the child and its reaped workers
        "peak_rss_mb": mem.peak_rss / MB,
        "peak_pss_mb": mem.peak_pss / MB,
        "peak_main_rss_mb": mem.peak_root_rss / MB,
        "peak_workers_rss_mb": mem.peak_children_rss / MB,
        "max_process_rss_mb": usage.ru_maxrss * 1024 / MB,  # ru_maxrss is in KiB on Linux
        "processes": mem.max_procs,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated conversions of one set: median times, highest memory peaks."""
    out = {k: max(r[k] for r in runs) for k in runs[0] if k.startswith(("peak", "max", "proc"))}
    out["images"] = runs[0]["images"]
    out["runs"] = len(runs)
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    out["images_per_s"] = out["images"] / out["seconds"]
    out["images_per_cpu_s"] = out["images"] / out["cpu_s"]
    return out


def bytes_per_image(shard_dir: Path, images: Path, ann_file: Path) -> dict[str, float]:
    """Bytes per image in the shards (by column group) and in the source files."""
    import pyarrow.parquet as pq

    from pipeline.data.shards import load_manifest, shard_paths

    manifest = load_manifest(shard_dir)
    n = sum(s["rows"] for s in manifest["shards"])
    total = image_col = ann_cols = 0
    for path in shard_paths(manifest, shard_dir):
        total += os.path.getsize(path)
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema == "image":
                    image_col += col.total_compressed_size
                elif col.path_in_schema.startswith("annotations"):
                    ann_cols += col.total_compressed_size
    jpeg = sum(p.stat().st_size for p in images.iterdir())
    ann = ann_file.stat().st_size
    return {
        "images": n,
        "shard": total / n,
        "shard_image": image_col / n,
        "shard_annotations": ann_cols / n,
        "shard_other": (total - image_col - ann_cols) / n,  # other columns, headers, footer
        "source": (jpeg + ann) / n,
        "source_jpeg": jpeg / n,
        "source_json": ann / n,
        "json_share": ann / (jpeg + ann),
        "shard_vs_source": total / (jpeg + ann),
    }


# ---------------------------------------------------------------------------------------------
# Plain decode + augment, side by side with train steps


class Records:
    """Every record of a shard directory in memory, handed out in chunks, cycling."""

    def __init__(self, shard_dir: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.data.reader import label_map
        from pipeline.data.shards import load_manifest, shard_paths

        manifest = load_manifest(shard_dir)
        tables = [pq.read_table(p) for p in shard_paths(manifest, shard_dir)]
        self.table = pa.concat_tables(tables).combine_chunks()
        self.labels = label_map(manifest)
        self.offset = 0
        self.epoch = 0

    def chunk(self, n: int) -> Any:
        import pyarrow as pa

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
    from pipeline.data.augment import augment_table

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
    """One training worker's step: forward, backward, clip, SGD (as `train_loop.train_step`)."""

    def __init__(self, cfg: Any, num_classes: int, threads: int) -> None:
        import torch

        from panet_model import build_panet

        self.threads = threads
        torch.manual_seed(0)
        self.model = build_panet(cfg, num_classes=num_classes)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=1e-4, momentum=0.9)

    def step(self, batch: tuple[list, list]) -> Timed:
        import torch

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
    from pipeline.data.augment import AugmentConfig

    return AugmentConfig(scales=(192, 256), scale_range=True, max_size=400)  # tiny_synth.yaml


def run_tiny(records: Records, s: Settings) -> SideBySide:
    from panet_model import PANetConfig
    from pipeline.data.collate import collate_train

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
    from panet_model import PANetConfig
    from pipeline.data.augment import AugmentConfig, augment_record, record_rng
    from pipeline.data.collate import collate_train

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


# ---------------------------------------------------------------------------------------------
# Ray Data


def ray_pass(shard_dir: Path, aug: Any) -> dict[str, Any]:
    """One pass of the training dataset through `iter_batches`: wall time and CPU time."""
    from pipeline.data.reader import build_train_dataset

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
    import ray
    from ray.data import DataContext

    from pipeline.data.reader import build_train_dataset

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


# ---------------------------------------------------------------------------------------------
# Report


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f} KB" if n >= 1024 else f"{n:,.0f} B"


def _opt(v: float | None, spec: str, width: int, unit: str = "") -> str:
    text = "-" if v is None else f"{v:{spec}}{unit}"
    return f"{text:>{width}}"


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def convert_growth(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    """How memory and time scale from the smaller to the larger set."""
    extra = big["images"] - small["images"]
    extra_s = big["seconds"] - small["seconds"]
    extra_cpu = big["cpu_s"] - small["cpu_s"]
    return {
        "tree": big["peak_rss_mb"] / small["peak_rss_mb"],
        "pss": big["peak_pss_mb"] / small["peak_pss_mb"],
        "main": big["peak_main_rss_mb"] / small["peak_main_rss_mb"],
        "workers": big["peak_workers_rss_mb"] / small["peak_workers_rss_mb"],
        "largest": big["max_process_rss_mb"] / small["max_process_rss_mb"],
        "kb_per_image": (big["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 / extra,
        # Fixed costs (interpreter, pool start-up, manifest) cancel out.
        "marginal_images_per_s": extra / extra_s if extra_s > 0 else None,
        "marginal_images_per_cpu_s": extra / extra_cpu if extra_cpu > 0 else None,
    }


def print_convert(conv: dict[str, dict[str, Any]], growth: dict[str, Any], s: Settings) -> None:
    small, big = conv["small"], conv["big"]
    print(
        f"Converter: convert_coco in a child process with its default pool "
        f"({os.cpu_count()} workers); RSS/PSS peaks sampled every 50 ms over its process tree"
    )
    header = (
        f"{'set':<28}{'images':>7}{'runs':>5}{'s':>6}{'img/s':>8}{'CPU s':>7}{'img/CPU-s':>10}"
        f"{'tree RSS':>9}{'main':>6}{'workers':>8}{'tree PSS':>9}{'max 1-proc':>11}{'procs':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, c in (
        (f"160..320 px, shards of {s.shard_size}", small),
        (f"160..320 px, shards of {s.shard_size}", big),
        (f"640..1024 px, shards of {LARGE_SHARD_SIZE}", conv["large"]),
    ):
        print(
            f"{label:<28}{c['images']:>7}{c['runs']:>5}{c['seconds']:>6.1f}"
            f"{c['images_per_s']:>8.1f}"
            f"{c['cpu_s']:>7.1f}{c['images_per_cpu_s']:>10.1f}"
            f"{c['peak_rss_mb']:>9.0f}{c['peak_main_rss_mb']:>6.0f}"
            f"{c['peak_workers_rss_mb']:>8.0f}{c['peak_pss_mb']:>9.0f}"
            f"{c['max_process_rss_mb']:>11.0f}{c['processes']:>6}"
        )
    g = growth
    print(
        f"memory, {small['images']} -> {big['images']} images "
        f"({big['images'] / small['images']:.0f}x): tree RSS x{g['tree']:.3f} "
        f"({g['kb_per_image']:+.1f} KB an image), PSS x{g['pss']:.3f}, main process "
        f"x{g['main']:.3f}, workers x{g['workers']:.3f}, largest process x{g['largest']:.3f}\n"
        "marginal throughput (extra images / extra seconds): "
        f"{_opt(g['marginal_images_per_s'], '.0f', 0)} img/s, "
        f"{_opt(g['marginal_images_per_cpu_s'], '.0f', 0)} img/CPU-s\n"
        "s: median over the runs (interleaved) of the convert_coco call (pool start-up "
        "included; after an untimed warm-up run); CPU s: user + system of the child and its\n"
        "workers (interpreter start included); memory in MB, highest of the runs: main = the "
        "converting process (it holds the parsed\nannotation index), workers = the rest of its "
        "tree, max 1-proc = wait4's ru_maxrss (the largest single process)"
    )


def print_bytes(sizes: dict[str, dict[str, float]]) -> None:
    print("\nBytes per image: shards vs source files (JPEG + annotation JSON)")
    header = (
        f"{'set':<14}{'source':>11}{'JPEG':>11}{'JSON':>10}{'JSON %':>8}{'shard':>11}"
        f"{'image col':>11}{'ann cols':>10}{'other':>9}{'shard/src':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, b in (("160..320 px", sizes["small"]), ("640..1024 px", sizes["large"])):
        print(
            f"{label:<14}{_kb(b['source']):>11}{_kb(b['source_jpeg']):>11}"
            f"{_kb(b['source_json']):>10}{100 * b['json_share']:>7.1f}%"
            f"{_kb(b['shard']):>11}{_kb(b['shard_image']):>11}"
            f"{_kb(b['shard_annotations']):>10}{_kb(b['shard_other']):>9}"
            f"{b['shard_vs_source']:>10.3f}"
        )
    print("other = remaining columns, page headers and footers")


def print_supply(
    tiny: SideBySide, r50: SideBySide, r50_sizes: list[tuple[int, int]], s: Settings
) -> None:
    print(
        "\nDecode + augment on ONE CPU (augment_table, no Ray) vs what one training worker "
        "consumes, side by side"
    )
    header = (
        f"{'model':<6}{'augmentation':<31}{'aug img/s':>10}{'img/CPU-s':>10}"
        f"{'train s/step':>13}{'train img/s':>12}{'supply':>9}{'node':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, label, x, node in (
        ("tiny", "MST 192..256, max 400", tiny, NODE_DECODE_CPUS["tiny"]),
        ("R-50", "paper MST 400..1200, max 1400", r50, NODE_DECODE_CPUS["r50"]),
    ):
        supply = x.supply
        node_supply = None if supply is None else supply * node
        print(
            f"{name:<6}{label:<31}{x.aug_rate:>10.1f}{x.aug_cpu_rate:>10.1f}"
            f"{_opt(x.step_s, '.2f', 13)}{_opt(x.train_rate, '.3f', 12)}"
            f"{_opt(supply, '.1f', 9, 'x')}{_opt(node_supply, '.1f', 9, 'x')}"
        )
    n_r50 = sum(len(st) for st in r50.steps)
    r50_note = (
        f"{n_r50} timed step(s) after {s.r50_warmup} warm-up"
        if n_r50
        else "no train step in this run (--r50-steps N adds N)"
    )
    print(
        f"tiny: preset 'tiny', batch 2, 1 thread, {len(tiny.steps)} rounds x {s.tiny_steps} steps "
        f"after 1 warm-up; supply in CPU time (both single-threaded): "
        f"{_opt(tiny.supply_cpu, '.1f', 0, 'x')}\n"
        f"R-50: preset 'panet', batch 2 at {r50_sizes[0][0]}x{r50_sizes[0][1]} and "
        f"{r50_sizes[1][0]}x{r50_sizes[1][1]} px, 2 threads, {r50_note}; decode of 640..1024 px "
        "images\n"
        "supply = decode img/s on one CPU / train img/s of one worker; per round (the steps vs "
        f"the two chunks around them), median; goal >= {GOAL:g}x\n"
        f"node = supply x the CPUs a node gives the pipeline per training worker (assumed: tiny "
        f"{NODE_DECODE_CPUS['tiny']}; R-50 {NODE_DECODE_CPUS['r50']} = coco_panet_r50.yaml "
        "cpus_per_worker 6, minus 1 for the train loop)"
    )


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
            f"{r['images_per_s']:>8.1f}{_opt(r['steady_images_per_s'], '.1f', 8)}"
            f"{r['per_cpu']:>10.1f}{r['plain_per_cpu']:>8.1f}{r['efficiency']:>6.2f}"
            f"{r['images_per_cpu_s']:>10.1f}{r['plain_per_cpu_s']:>8.1f}"
            f"{r['cpu_efficiency']:>6.2f}{_opt(r['supply'], '.1f', 9, 'x')}"
        )
    print(
        "img/s: whole pass, first-batch latency included; steady: after the first batch (>= 5 "
        "batches only)\nplain: augment_table on one CPU just before and after the pass; eff = "
        "Ray / plain\nimg/CPU-s: images per CPU-second of this process tree (driver + every Ray "
        "process) during the pass\nsupply = img/s/CPU / train img/s of the table above (measured "
        "earlier, not side by side)"
    )


def run(tmp: Path, s: Settings, cpus: int) -> dict[str, Any]:
    from pipeline.data.augment import AugmentConfig
    from pipeline.data.synth import write_synthetic

    n_small, n_big = s.small
    log(f"synthetic data: {n_big} images of 160..320 px, {s.large} of 640..1024 px ...")
    small_raw = write_synthetic("coco", n_big, 0, tmp / "raw_small")
    large_raw = write_synthetic("coco", s.large, 1, tmp / "raw_large", min_size=640, max_size=1024)
    small_images, large_images = small_raw / "images" / "train", large_raw / "images" / "train"
    small_ann = small_raw / "annotations" / "instances_train.json"
    large_ann = large_raw / "annotations" / "instances_train.json"
    sub_ann = coco_subset(small_ann, n_small, small_raw / "annotations" / "instances_sub.json")
    # Untimed: the first child pays for cold imports (file cache), which would favour the later.
    log("convert: warm-up ...")
    convert(sub_ann, small_images, tmp / "shards_warmup", s.shard_size)
    runs: dict[str, list[dict[str, Any]]] = {"small": [], "big": []}
    for rep in range(CONVERT_REPS):  # interleaved: load changes hit both sets alike
        for key, ann in (("small", sub_ann), ("big", small_ann)):
            log(f"convert {key}, run {rep + 1}/{CONVERT_REPS} ...")
            out = tmp / f"shards_{key}_{rep}"
            runs[key].append(convert(ann, small_images, out, s.shard_size))
            if rep < CONVERT_REPS - 1:
                shutil.rmtree(out)
    small_dir = tmp / f"shards_big_{CONVERT_REPS - 1}"
    large_dir = tmp / "shards_large"
    log("convert large (once) ...")
    runs["large"] = [convert(large_ann, large_images, large_dir, LARGE_SHARD_SIZE)]
    conv = {key: summarize(r) for key, r in runs.items()}
    growth = convert_growth(conv["small"], conv["big"])
    print_convert(conv, growth, s)
    sizes = {
        "small": bytes_per_image(small_dir, small_images, small_ann),
        "large": bytes_per_image(large_dir, large_images, large_ann),
    }
    print_bytes(sizes)

    log("tiny: augment chunks and train steps, side by side ...")
    tiny = run_tiny(Records(small_dir), s)
    log("R-50: augment chunks and train steps, side by side ...")
    r50, r50_sizes = run_r50(Records(large_dir), s)
    print_supply(tiny, r50, r50_sizes, s)

    log(f"Ray Data on a local ray.init(num_cpus={cpus}) ...")
    sets = {
        "tiny": (small_dir, tiny_augment(), s.tiny_chunk),
        "r50": (large_dir, AugmentConfig.paper(), s.r50_chunk),
    }
    ray_res = run_ray(tmp, sets, cpus)
    consumption = {"tiny": tiny.train_rate, "r50": r50.train_rate}
    for name, r in ray_res.items():
        cons = consumption[name]
        r["supply"] = None if cons is None else r["per_cpu"] / cons
    print_ray(ray_res, cpus)

    small, big, large = conv["small"], conv["big"], conv["large"]
    b, bl = sizes["small"], sizes["large"]
    rt, rr = ray_res["tiny"], ray_res["r50"]
    r50_node = None if r50.supply is None else r50.supply * NODE_DECODE_CPUS["r50"]
    return {
        "cpus": cpus,
        "convert_images": big["images"],
        "convert_images_per_s": round(big["images_per_s"], 1),
        "convert_seconds": round(big["seconds"], 2),
        "convert_images_per_cpu_s": round(big["images_per_cpu_s"], 1),
        "convert_runs": big["runs"],
        "convert_peak_rss_mb": round(big["peak_rss_mb"], 1),
        "convert_peak_pss_mb": round(big["peak_pss_mb"], 1),
        "convert_max_process_rss_mb": round(big["max_process_rss_mb"], 1),
        "convert_small_images": small["images"],
        "convert_small_images_per_s": round(small["images_per_s"], 1),
        "convert_small_images_per_cpu_s": round(small["images_per_cpu_s"], 1),
        "convert_small_peak_rss_mb": round(small["peak_rss_mb"], 1),
        "convert_small_peak_pss_mb": round(small["peak_pss_mb"], 1),
        "convert_small_max_process_rss_mb": round(small["max_process_rss_mb"], 1),
        "convert_main_peak_rss_mb": round(big["peak_main_rss_mb"], 1),
        "convert_workers_peak_rss_mb": round(big["peak_workers_rss_mb"], 1),
        "convert_small_main_peak_rss_mb": round(small["peak_main_rss_mb"], 1),
        "convert_small_workers_peak_rss_mb": round(small["peak_workers_rss_mb"], 1),
        "convert_rss_growth_ratio": round(growth["tree"], 3),
        "convert_pss_growth_ratio": round(growth["pss"], 3),
        "convert_main_growth_ratio": round(growth["main"], 3),
        "convert_workers_growth_ratio": round(growth["workers"], 3),
        "convert_max_process_growth_ratio": round(growth["largest"], 3),
        "convert_rss_growth_kb_per_image": round(growth["kb_per_image"], 2),
        "convert_marginal_images_per_s": _round(growth["marginal_images_per_s"], 1),
        "convert_marginal_images_per_cpu_s": _round(growth["marginal_images_per_cpu_s"], 1),
        "convert_large_images": large["images"],
        "convert_large_images_per_s": round(large["images_per_s"], 1),
        "convert_large_peak_rss_mb": round(large["peak_rss_mb"], 1),
        "shard_bytes_per_image": round(b["shard"]),
        "shard_image_bytes_per_image": round(b["shard_image"]),
        "shard_annotation_bytes_per_image": round(b["shard_annotations"]),
        "source_bytes_per_image": round(b["source"]),
        "source_jpeg_bytes_per_image": round(b["source_jpeg"]),
        "source_json_bytes_per_image": round(b["source_json"]),
        "source_json_share": round(b["json_share"], 4),
        "shard_vs_source_ratio": round(b["shard_vs_source"], 3),
        "large_shard_bytes_per_image": round(bl["shard"]),
        "large_source_bytes_per_image": round(bl["source"]),
        "large_source_json_share": round(bl["json_share"], 4),
        "large_shard_vs_source_ratio": round(bl["shard_vs_source"], 3),
        "aug_tiny_images_per_s_per_cpu": round(tiny.aug_rate, 1),
        "aug_tiny_images_per_cpu_s": round(tiny.aug_cpu_rate, 1),
        "aug_r50_images_per_s_per_cpu": round(r50.aug_rate, 2),
        "aug_r50_images_per_cpu_s": round(r50.aug_cpu_rate, 2),
        "ray_data_num_cpus": cpus,
        "ray_data_images": rt["images"],
        "ray_data_images_per_s": round(rt["images_per_s"], 1),
        "ray_data_images_per_s_per_cpu": round(rt["per_cpu"], 1),
        "ray_data_steady_images_per_s": _round(rt["steady_images_per_s"], 1),
        "ray_data_first_batch_s": round(rt["first_batch_s"], 2),
        "ray_data_images_per_cpu_s": round(rt["images_per_cpu_s"], 1),
        "ray_data_efficiency_vs_plain": round(rt["efficiency"], 3),
        "ray_data_cpu_efficiency_vs_plain": round(rt["cpu_efficiency"], 3),
        "ray_data_r50_images": rr["images"],
        "ray_data_r50_images_per_s": round(rr["images_per_s"], 2),
        "ray_data_r50_images_per_s_per_cpu": round(rr["per_cpu"], 2),
        "ray_data_r50_images_per_cpu_s": round(rr["images_per_cpu_s"], 2),
        "ray_data_r50_efficiency_vs_plain": round(rr["efficiency"], 3),
        "ray_data_r50_cpu_efficiency_vs_plain": round(rr["cpu_efficiency"], 3),
        "tiny_train_s_per_step": _round(tiny.step_s, 3),
        "tiny_train_images_per_s": _round(tiny.train_rate, 3),
        "r50_train_s_per_step": _round(r50.step_s, 2),
        "r50_train_images_per_s": _round(r50.train_rate, 4),
        "r50_train_steps": sum(len(st) for st in r50.steps),
        "r50_train_warmup_steps": s.r50_warmup if r50.steps else 0,
        "r50_train_image_sizes": r50_sizes,
        "supply_ratio_vs_tiny": _round(tiny.supply, 2),
        "supply_ratio_vs_tiny_cpu_time": _round(tiny.supply_cpu, 2),
        "supply_ratio_vs_tiny_ray_data": _round(rt["supply"], 2),
        "supply_ratio_vs_r50": _round(r50.supply, 1),
        "supply_ratio_vs_r50_ray_data": _round(rr["supply"], 1),
        "supply_ratio_vs_r50_node": _round(r50_node, 1),
        "node_decode_cpus_per_worker": NODE_DECODE_CPUS,
        "supply_goal": GOAL,
        "meets_goal_tiny": tiny.supply is not None and tiny.supply >= GOAL,
        "meets_goal_r50": None if r50.supply is None else r50.supply >= GOAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sets, no R-50 step: < 3 min")
    parser.add_argument(
        "--r50-steps", type=int, default=None, help="timed R-50 train steps (quick 0, full 2)"
    )
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    if args.r50_steps is not None:
        s = Settings(**{**s.__dict__, "r50_steps": args.r50_steps})
    cpus = os.cpu_count() or 1
    machine = print_machine()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="panet-bench-"))
    try:
        result = {"quick": args.quick, **run(tmp, s, cpus)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine
    print(f"\n(total {result['elapsed_s']:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
