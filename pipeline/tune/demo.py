"""`make sweep-demo`: the demo data, then 3 rows x 2 seeds (jobs/sweeps/demo.yaml) in MLflow.

Re-running reuses what exists: the shards are kept and the sweep is restored by name (finished
trials are not run again), so a second run prints the same results at once.

    python -m pipeline.tune.demo [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.config import parse_set
from pipeline.demo import CONFIG, TRAIN_IMAGES, TRAIN_SEED, VAL_IMAGES, VAL_SEED, ensure_shards
from pipeline.tune.cli import print_summary
from pipeline.tune.runner import prepare, run_sweep
from pipeline.tune.sweep import base_job, expand, load_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A 6-trial Ray Tune sweep on the demo data.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    try:
        sweep = load_sweep("demo")
        job, base = base_job(CONFIG, parse_set(args.set))
        prepared = prepare(sweep, expand(sweep), job, base)
    except ValueError as err:
        print(f"sweep-demo: error: {err}", file=sys.stderr)
        return 2
    root = Path(job.data.train).parents[1]  # demo/shards/train -> demo/
    ensure_shards(root / "raw", root / "shards", "train", TRAIN_IMAGES, TRAIN_SEED)
    ensure_shards(root / "raw", root / "shards", "val", VAL_IMAGES, VAL_SEED)
    result = run_sweep(prepared)
    print_summary(result)
    print(f"\n[sweep-demo] done in {time.perf_counter() - t0:.0f} s")
    return 1 if result["unfinished"] else 0


if __name__ == "__main__":
    sys.exit(main())
