"""`make demo`: synthetic data -> shards -> 2-worker SyncBN training -> COCO eval -> MLflow.

Re-running reuses what exists: the data set and shards are kept, and the training job resumes
from its last checkpoint (a finished job just reports its results again).

    python -m pipeline.demo [--set key=value ...] [--resume | --new-name]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.config import load_job_config, parse_set
from pipeline.data.convert_coco import convert_coco
from pipeline.data.manifest import load_manifest
from pipeline.data.synth import write_synthetic
from pipeline.train.cli import print_summary
from pipeline.train.driver import run_training
from pipeline.train.resume import with_free_name

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_synth.yaml"
TRAIN_IMAGES, VAL_IMAGES = 600, 80
TRAIN_SEED, VAL_SEED = 0, 1


def ensure_shards(raw: Path, shards: Path, split: str, images: int, seed: int) -> Path:
    """Synthesize a COCO-layout split and convert it, unless a complete shard dir exists."""
    out = shards / split
    try:
        manifest = load_manifest(out)
        if sum(s["rows"] for s in manifest["shards"]) == images:
            print(f"[demo] reusing {out} ({images} images)")
            return out
    except (ValueError, FileNotFoundError):
        pass
    annotations = raw / split / "annotations" / f"instances_{split}.json"
    if not annotations.is_file():
        print(f"[demo] generating {images} synthetic {split} images in {raw / split}")
        write_synthetic("coco", images, seed, raw / split, split=split)
    print(f"[demo] converting {split} to shards in {out}")
    convert_coco(
        annotations, raw / split / "images" / split, out, resume=out.exists(), shard_size=64
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="End-to-end demo on the synthetic data set.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="as `panet train --resume`")
    existing.add_argument("--new-name", action="store_true", help="as `panet train --new-name`")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        job = load_job_config(CONFIG, parse_set(args.set))
    except ValueError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    if args.new_name:
        renamed = with_free_name(job)
        if renamed.name != job.name:
            print(f"[demo] training a new job: {renamed.name!r}")
        job = renamed
    root = Path(job.data.train).resolve().parents[1]  # demo/shards/train -> demo/
    ensure_shards(root / "raw", root / "shards", "train", TRAIN_IMAGES, TRAIN_SEED)
    ensure_shards(root / "raw", root / "shards", "val", VAL_IMAGES, VAL_SEED)

    try:
        result = run_training(job, allow_changes=args.resume)
    except (ValueError, FileNotFoundError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    print_summary(result)
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
