"""Converter throughput and peak memory: does memory grow with the number of images?

On synthetic COCO data written to a temp dir (removed at the end): `convert_coco` in a child
process (with its default pool of `os.cpu_count()` workers) on N and on 2-5x N images, three
interleaved runs of each, and once on large images. Peak memory is the sum of RSS (and of PSS,
which counts shared library pages once) over the child's whole process tree, sampled from /proc
every 50 ms; `wait4` adds the CPU time of the tree and the exact peak RSS of its largest single
process. The ratio between the two sets shows whether memory grows with the number of images.

    python benchmarks/data_convert.py [--quick]

--quick: 250 vs 500 images, 48 large images; the full run: 1,000 vs 5,000 and 256. The last line
is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from data_bench import (  # benchmarks/ is on sys.path when run as a script
    LARGE_SHARD_SIZE,
    MB,
    Settings,
    figures,
    fmt_opt,
    log,
    main,
    synthetic_sets,
)
from procstat import TreeMemory

QUICK_HELP = "250 vs 500 images, 48 large ones"
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

# The JSON figures of each set and of the growth between the two small sets: name -> digits.
SET_FIGURES = {
    "images": None,
    "runs": None,
    "seconds": 2,
    "images_per_s": 1,
    "images_per_cpu_s": 1,
    "peak_rss_mb": 1,
    "peak_pss_mb": 1,
    "main_peak_rss_mb": 1,
    "workers_peak_rss_mb": 1,
    "max_process_rss_mb": 1,
}
GROWTH_FIGURES = {
    "rss_growth_ratio": 3,
    "pss_growth_ratio": 3,
    "main_growth_ratio": 3,
    "workers_growth_ratio": 3,
    "max_process_growth_ratio": 3,
    "rss_growth_kb_per_image": 2,
    "marginal_images_per_s": 1,
    "marginal_images_per_cpu_s": 1,
}


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
        "main_peak_rss_mb": mem.peak_root_rss / MB,
        "workers_peak_rss_mb": mem.peak_children_rss / MB,
        "max_process_rss_mb": usage.ru_maxrss * 1024 / MB,  # ru_maxrss is in KiB on Linux
        "processes": mem.max_procs,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated conversions of one set: median times, highest memory peaks."""
    out = {k: max(r[k] for r in runs) for k in runs[0] if k.endswith("_mb") or k == "processes"}
    out["images"] = runs[0]["images"]
    out["runs"] = len(runs)
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    out["images_per_s"] = out["images"] / out["seconds"]
    out["images_per_cpu_s"] = out["images"] / out["cpu_s"]
    return out


def convert_growth(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    """How memory and time scale from the smaller to the larger set."""
    extra = big["images"] - small["images"]
    extra_s = big["seconds"] - small["seconds"]
    extra_cpu = big["cpu_s"] - small["cpu_s"]
    return {
        "rss_growth_ratio": big["peak_rss_mb"] / small["peak_rss_mb"],
        "pss_growth_ratio": big["peak_pss_mb"] / small["peak_pss_mb"],
        "main_growth_ratio": big["main_peak_rss_mb"] / small["main_peak_rss_mb"],
        "workers_growth_ratio": big["workers_peak_rss_mb"] / small["workers_peak_rss_mb"],
        "max_process_growth_ratio": big["max_process_rss_mb"] / small["max_process_rss_mb"],
        "rss_growth_kb_per_image": (big["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 / extra,
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
            f"{c['peak_rss_mb']:>9.0f}{c['main_peak_rss_mb']:>6.0f}"
            f"{c['workers_peak_rss_mb']:>8.0f}{c['peak_pss_mb']:>9.0f}"
            f"{c['max_process_rss_mb']:>11.0f}{c['processes']:>6}"
        )
    g = growth
    print(
        f"memory, {small['images']} -> {big['images']} images "
        f"({big['images'] / small['images']:.0f}x): tree RSS x{g['rss_growth_ratio']:.3f} "
        f"({g['rss_growth_kb_per_image']:+.1f} KB an image), PSS x{g['pss_growth_ratio']:.3f}, "
        f"main process x{g['main_growth_ratio']:.3f}, workers x{g['workers_growth_ratio']:.3f}, "
        f"largest process x{g['max_process_growth_ratio']:.3f}\n"
        "marginal throughput (extra images / extra seconds): "
        f"{fmt_opt(g['marginal_images_per_s'], '.0f', 0)} img/s, "
        f"{fmt_opt(g['marginal_images_per_cpu_s'], '.0f', 0)} img/CPU-s\n"
        "s: median over the runs (interleaved) of the convert_coco call (pool start-up "
        "included; after an untimed warm-up run); CPU s: user + system of the child and its\n"
        "workers (interpreter start included); memory in MB, highest of the runs: main = the "
        "converting process (it holds the parsed\nannotation index), workers = the rest of its "
        "tree, max 1-proc = wait4's ru_maxrss (the largest single process)"
    )


def run(tmp: Path, s: Settings) -> dict[str, Any]:
    small_set, large_set = synthetic_sets(tmp, s)
    sub_ann = coco_subset(
        small_set.annotations, s.small[0], small_set.annotations.with_name("instances_sub.json")
    )
    # Untimed: the first child pays for cold imports (file cache), which would favour the later.
    log("convert: warm-up ...")
    convert(sub_ann, small_set.images, tmp / "shards_warmup", s.shard_size)
    runs: dict[str, list[dict[str, Any]]] = {"small": [], "big": []}
    for rep in range(CONVERT_REPS):  # interleaved: load changes hit both sets alike
        for key, ann in (("small", sub_ann), ("big", small_set.annotations)):
            log(f"convert {key}, run {rep + 1}/{CONVERT_REPS} ...")
            out = tmp / f"shards_{key}_{rep}"
            runs[key].append(convert(ann, small_set.images, out, s.shard_size))
            shutil.rmtree(out)
    log("convert large (once) ...")
    large = convert(large_set.annotations, large_set.images, tmp / "shards_large", LARGE_SHARD_SIZE)
    conv = {key: summarize(r) for key, r in runs.items()}
    conv["large"] = summarize([large])
    growth = convert_growth(conv["small"], conv["big"])
    print_convert(conv, growth, s)
    return {
        "cpus": os.cpu_count() or 1,
        **figures("convert_", conv["big"], SET_FIGURES),
        **figures("convert_small_", conv["small"], SET_FIGURES),
        **figures("convert_large_", conv["large"], SET_FIGURES),
        **figures("convert_", growth, GROWTH_FIGURES),
    }


if __name__ == "__main__":
    main(__doc__, QUICK_HELP, run)
