"""What does an idle local Ray cluster beside a CPU training step cost on a small machine?

During `panet train` the train worker shares the machine with Ray's own processes: raylet,
GCS, dashboard, and one process per actor (Train's controller and helpers, Ray Data's split
coordinator and stats actor, ...). Every Ray worker process, busy or not, wakes its main thread
every 10 ms to check for signals (Ray's core worker; not configurable), and a 2-thread step
presumably waits for whichever thread was descheduled. This times `tiny` train steps (2 threads, batch 4,
the demo's augmented and grouped batches, cycled) in one process under three conditions,
rotated in windows so that every condition sees the same machine drift:

1. `none`: nothing else running;
2. `sleepers`: N processes that only wake every 10 ms (no work: the wake-ups alone);
3. `ray`: `ray.init()` (a local cluster with the dashboard, as `panet train` starts) plus N
   idle actors, about what a Ray Train + Ray Data job keeps alive.

It reports the median seconds per step, the ratio to `none`, and the machine's wake-ups per
second (voluntary context switches of every process) in each condition.

    python benchmarks/ray_background.py [--quick] [--actors N] [--rounds R] [--steps K]

The last line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONDITIONS = ("none", "sleepers", "ray")
SETTLE_S = 3.0  # seconds after a condition starts before its steps are timed
SLEEPER = "import time\nwhile True:\n    time.sleep(0.01)"  # Ray's signal-check period


def wakeups() -> int:
    """Voluntary context switches of every thread on the machine so far (Linux /proc)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
                            break
        except OSError:  # the thread ended meanwhile
            continue
    return total


@contextmanager
def background(condition: str, n: int) -> Iterator[None]:
    """Run the condition's background for the duration of the block."""
    if condition == "none":
        yield
    elif condition == "sleepers":
        procs = [subprocess.Popen([sys.executable, "-c", SLEEPER]) for _ in range(n)]
        try:
            yield
        finally:
            for p in procs:
                p.kill()
                p.wait()
    elif condition == "ray":
        import ray

        @ray.remote(num_cpus=0)
        class Idle:
            def ready(self) -> bool:
                return True

        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
        try:
            actors = [Idle.remote() for _ in range(n)]
            ray.get([a.ready.remote() for a in actors])
            yield
        finally:
            ray.shutdown()
    else:
        raise ValueError(f"unknown condition {condition!r}; choose one of {CONDITIONS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 steps")
    parser.add_argument("--actors", type=int, default=10, help="sleepers / idle actors (10)")
    parser.add_argument("--rounds", type=int, default=None, help="windows per condition (3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps a window (16)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    steps = args.steps or (8 if args.quick else 16)

    sys.path.insert(0, str(Path(__file__).parent))
    from grouping import augmented_rows, batches, make_step
    from machine import print_machine

    from pipeline.config import load_job_config
    from pipeline.demo import CONFIG, TRAIN_IMAGES, TRAIN_SEED, ensure_shards

    machine = print_machine()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = ensure_shards(
            Path(tmp) / "raw", Path(tmp) / "shards", "train", TRAIN_IMAGES, TRAIN_SEED
        )
        job = load_job_config(CONFIG, {"data.train": str(shards), "data.val": str(shards)})
        rows, num_classes = augmented_rows(shards, 128, job)
    bs = batches(rows, job.solver.ims_per_batch, job.data.group_window)
    step = make_step(job, num_classes, args.threads)
    for b in bs:  # every batch shape seen once: oneDNN's primitives exist before timing
        step(b)

    times: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    rates: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    k = 0
    for r in range(rounds):
        order = CONDITIONS[r % 3 :] + CONDITIONS[: r % 3]  # each condition first in turn
        for condition in order:
            with background(condition, args.actors):
                time.sleep(SETTLE_S)
                w0, c0 = wakeups(), time.perf_counter()
                for _ in range(steps):
                    times[condition].append(step(bs[k % len(bs)]))
                    k += 1
                rates[condition].append((wakeups() - w0) / (time.perf_counter() - c0))
            print(
                f"round {r + 1}/{rounds} {condition}: {statistics.median(times[condition]):.3f}"
                " s / step so far",
                flush=True,
            )

    median = {c: statistics.median(ts) for c, ts in times.items()}
    wake = {c: statistics.mean(v) for c, v in rates.items()}
    print(
        f"\ntiny train step, {args.threads} threads, batch {job.solver.ims_per_batch}; "
        f"{rounds} windows of {steps} steps per condition, rotated; {args.actors} sleepers / actors"
    )
    print("| beside the step | wake-ups / s | s / step (median) | vs nothing |")
    print("|---|---|---|---|")
    labels = {
        "none": "nothing",
        "sleepers": f"{args.actors} processes waking every 10 ms",
        "ray": f"idle local Ray cluster + {args.actors} idle actors",
    }
    for c in CONDITIONS:
        print(
            f"| {labels[c]} | {wake[c]:.0f} | {median[c]:.3f} | {median[c] / median['none']:.3f} |"
        )
    print(f"\n{time.perf_counter() - t0:.0f} s")
    print(
        json.dumps(
            {
                "step_s": {c: round(v, 4) for c, v in median.items()},
                "ratio_sleepers": round(median["sleepers"] / median["none"], 4),
                "ratio_ray": round(median["ray"] / median["none"], 4),
                "wakeups_per_s": {c: round(v) for c, v in wake.items()},
                "actors": args.actors,
                "rounds": rounds,
                "steps": steps,
                "machine": machine,
            }
        )
    )


if __name__ == "__main__":
    main()
