"""What does a Tune sweep cost beyond its training runs?

The same three trials (the tiny preset on a small synthetic data set, 2 workers each) run as
three sequential `panet train` jobs (`run_training`) and as one 3-trial sweep (`run_sweep`), on
one local Ray cluster with its dashboard, in alternating order round after round. Reported per
side (medians over runs): the gap before a run's MLflow run opens (a trial: its actor's start
and imports), start-up (run opened -> first training step, `log_every: 1`), training (first ->
last step) and the end (last step -> run closed); the sweep's overhead per trial; and the
median over rounds of the sweep's total over the sequential total (target <= 1.15).

With `--search`, the sides are two sweeps of the same budget over the same space (`--trials`
trials, one at a time, a log-uniform learning rate): random search drawn up front and Optuna's
TPE (`search.algorithm: optuna`); reported: their totals and phases, Optuna's overhead per trial,
the median over rounds of Optuna's total over random search's (target <= 1.05), and the time
Optuna's searcher itself takes per trial (ask + tell on its SQLite study).

    python benchmarks/sweep.py [--steps N] [--images N] [--rounds N] [--search [--trials N]]

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
from machine import print_machine  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"
PHASES = ("gap", "startup", "train", "end")


def sweep_yaml(path: Path, name: str) -> Path:
    """Three trials that differ in a way that costs the same: the learning rate."""
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "variants": [
                    {"name": f"lr{i}", "set": {"solver.base_lr": lr}}
                    for i, lr in enumerate((0.003, 0.002, 0.001))
                ],
            }
        )
    )
    return path


def phases(uri: str, run_ids: list[str]) -> list[dict[str, float]]:
    """Each run's phases in seconds (runs in the order they ran; `gap` from the previous end)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out, previous_end = [], None
    for run_id in run_ids:
        run = client.get_run(run_id)
        steps = [m.timestamp for m in client.get_metric_history(run_id, "train/loss")]
        start, end = run.info.start_time, run.info.end_time
        out.append(
            {
                "gap": (start - previous_end) / 1000 if previous_end else float("nan"),
                "startup": (min(steps) - start) / 1000,
                "train": (max(steps) - min(steps)) / 1000,
                "end": (end - max(steps)) / 1000,
                "run": (end - start) / 1000,
            }
        )
        previous_end = end
    return out


def search_yaml(path: Path, name: str, algorithm: str, trials: int) -> Path:
    """`trials` trials of one space, run one at a time so that TPE sees every earlier score."""
    search = {"algorithm": algorithm, "solver.base_lr": {"loguniform": [0.001, 0.005]}}
    spec = {"name": name, "samples": trials, "concurrency": 1, "seed": 0, "search": search}
    path.write_text(yaml.safe_dump(spec))
    return path


def searcher_ms(trials: int) -> float:
    """Milliseconds Optuna's searcher takes per trial: suggest, one result, completion."""
    from pipeline.tune.search import optuna_searcher
    from pipeline.tune.sweep import load_sweep

    root = Path(tempfile.mkdtemp(prefix="panet-bench-optuna-"))
    spec = load_sweep(str(search_yaml(root / "s.yaml", "s", "optuna", trials)))
    searcher = optuna_searcher(spec, root)
    t0 = time.perf_counter()
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        result = {"segm_AP": config["solver.base_lr"] * 10, "training_iteration": 1}
        searcher.on_trial_result(f"t{i}", result)
        searcher.on_trial_complete(f"t{i}", result)
    return 1000 * (time.perf_counter() - t0) / trials


def median(values: list[float]) -> float:
    kept = [v for v in values if v == v]  # the first run of a side has no gap
    return statistics.median(kept) if kept else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps a trial")
    parser.add_argument("--images", type=int, default=48, help="training images")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both sides")
    parser.add_argument("--search", action="store_true", help="random search against Optuna")
    parser.add_argument("--trials", type=int, default=4, help="trials a sweep, with --search")
    args = parser.parse_args()
    machine = print_machine()

    import ray

    from pipeline import tracking
    from pipeline.config import load_job_config
    from pipeline.demo import ensure_shards
    from pipeline.ray_session import start_local
    from pipeline.train.driver import run_training
    from pipeline.tune.runner import prepare, run_sweep
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
    start_local(4, state_api=True)

    def sequential(r: int, prepared: Any) -> tuple[float, list[dict[str, float]]]:
        t0, ids, uri = time.perf_counter(), [], ""
        for trial in prepared.trials:
            flat = {**prepared.base, **trial.overrides, **sets}
            flat.update({"name": f"seq{r}-{trial.name}", "checkpoint.storage_path": str(root)})
            result = run_training(load_job_config(None, flat))
            ids.append(result["run_id"])
            uri = result["tracking_uri"]
        return time.perf_counter() - t0, phases(uri, ids)

    def sweep(prepared: Any) -> tuple[float, list[dict[str, float]]]:
        t0 = time.perf_counter()
        out = run_sweep(prepared)
        total = time.perf_counter() - t0
        kids = tracking.child_runs(out["tracking_uri"], out["parent_run_id"])
        ids = [r.info.run_id for r in sorted(kids, key=lambda r: r.info.start_time)]
        return total, phases(out["tracking_uri"], ids)

    def prepared_sweep(path: Path) -> Any:
        spec = load_sweep(str(path))
        job, base = base_job(CONFIG, {**sets, "checkpoint.storage_path": str(root)})
        return prepare(spec, expand(spec), job, base)

    rounds: list[dict[str, Any]] = []
    sides = ("random", "optuna") if args.search else ("sequential", "sweep")
    for r in range(args.rounds):
        done = {}
        for side in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
            if args.search:
                path = search_yaml(root / f"{side}{r}.yaml", f"{side}{r}", side, args.trials)
                done[side] = sweep(prepared_sweep(path))
            elif side == "sequential":
                done[side] = sequential(r, prepared_sweep(sweep_yaml(root / "seq.yaml", "seq")))
            else:
                done[side] = sweep(prepared_sweep(sweep_yaml(root / f"bench{r}.yaml", f"bench{r}")))
        rounds.append(done)
    ray.shutdown()
    if args.search:
        report_search(args, rounds, machine)
        return

    n = 3
    ratios = [x["sweep"][0] / x["sequential"][0] for x in rounds]
    overheads = [(x["sweep"][0] - x["sequential"][0]) / n for x in rounds]
    runs = {side: [p for x in rounds for p in x[side][1]] for side in ("sequential", "sweep")}
    table = {
        side: {k: median([p[k] for p in runs[side]]) for k in (*PHASES, "run")} for side in runs
    }
    print(f"\n3 trials x {args.steps} steps, tiny preset, 2 workers, {args.images} images, "
          f"{args.rounds} rounds (medians over runs)")  # fmt: skip
    print(f"{'':<26}{'total s':>9}{'gap s':>8}{'start-up s':>12}{'train s':>9}{'end s':>7}")
    for side, label in (("sequential", "sequential panet train"), ("sweep", "one 3-trial sweep")):
        total = statistics.median(x[side][0] for x in rounds)
        t = table[side]
        print(f"{label:<26}{total:>9.1f}{t['gap']:>8.1f}{t['startup']:>12.1f}{t['train']:>9.1f}"
              f"{t['end']:>7.1f}")  # fmt: skip
    ratio = statistics.median(ratios)
    print(f"sweep / sequential by round: {', '.join(f'{x:.3f}' for x in ratios)}; median "
          f"{ratio:.3f} (target <= 1.15); overhead a trial {statistics.median(overheads):+.1f} s")  # fmt: skip
    result = {
        "trials": n,
        "steps": args.steps,
        "rounds": args.rounds,
        "sweep_vs_sequential_ratio": round(ratio, 3),
        "ratios": [round(x, 3) for x in ratios],
        "tune_overhead_per_trial_s": round(statistics.median(overheads), 1),
        "trial_startup_s": round(table["sweep"]["startup"], 1),
        "train_startup_s": round(table["sequential"]["startup"], 1),
        "sequential_s": [round(x["sequential"][0], 1) for x in rounds],
        "sweep_s": [round(x["sweep"][0], 1) for x in rounds],
        "phases_s": {s: {k: round(v, 1) for k, v in t.items()} for s, t in table.items()},
        "machine": machine,
    }
    print(json.dumps(result))


def report_search(args: argparse.Namespace, rounds: list[dict[str, Any]], machine: Any) -> None:
    """The table and the JSON line of `--search`: random search against Optuna."""
    n = args.trials
    ratios = [x["optuna"][0] / x["random"][0] for x in rounds]
    overheads = [(x["optuna"][0] - x["random"][0]) / n for x in rounds]
    runs = {side: [p for x in rounds for p in x[side][1]] for side in ("random", "optuna")}
    table = {
        side: {k: median([p[k] for p in runs[side]]) for k in (*PHASES, "run")} for side in runs
    }
    ask_tell = searcher_ms(16)
    print(f"\n{n} trials x {args.steps} steps a sweep, one at a time, tiny preset, 2 workers, "
          f"{args.images} images, {args.rounds} rounds (medians over runs)")  # fmt: skip
    print(f"{'':<26}{'total s':>9}{'gap s':>8}{'start-up s':>12}{'train s':>9}{'end s':>7}")
    for side, label in (("random", "random search"), ("optuna", "Optuna (TPE)")):
        total = statistics.median(x[side][0] for x in rounds)
        t = table[side]
        print(f"{label:<26}{total:>9.1f}{t['gap']:>8.1f}{t['startup']:>12.1f}{t['train']:>9.1f}"
              f"{t['end']:>7.1f}")  # fmt: skip
    ratio = statistics.median(ratios)
    print(f"optuna / random by round: {', '.join(f'{x:.3f}' for x in ratios)}; median "
          f"{ratio:.3f} (target <= 1.05); overhead a trial {statistics.median(overheads):+.1f} s; "
          f"the searcher itself {ask_tell:.1f} ms a trial (ask + tell, SQLite study)")  # fmt: skip
    result = {
        "trials": n,
        "steps": args.steps,
        "rounds": args.rounds,
        "optuna_vs_random_ratio": round(ratio, 3),
        "ratios": [round(x, 3) for x in ratios],
        "optuna_overhead_per_trial_s": round(statistics.median(overheads), 2),
        "searcher_ms_per_trial": round(ask_tell, 1),
        "random_s": [round(x["random"][0], 1) for x in rounds],
        "optuna_s": [round(x["optuna"][0], 1) for x in rounds],
        "phases_s": {s: {k: round(v, 1) for k, v in t.items()} for s, t in table.items()},
        "machine": machine,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
