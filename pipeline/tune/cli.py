"""`panet tune`: run a sweep file (a shipped one by name, or your own) with Ray Tune."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.args import add_set_option
from pipeline.config import parse_set, resolve_config, shipped_names
from pipeline.tune.sweep import base_job, describe, expand, load_sweep


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="sweep the paper's ablations or hyper-parameters with Ray Tune, tracked in MLflow",
        description="Run a sweep: every trial is a full `panet train` job, every trial an MLflow "
        "run nested under the sweep's run. Shipped sweeps (jobs/sweeps/, by name): "
        f"{', '.join(shipped_names('sweeps'))}. Re-running the same sweep name resumes it.",
    )
    p.add_argument("--sweep", required=True, help="a sweep name (jobs/sweeps/) or a YAML file")
    p.add_argument(
        "--config",
        help="the base job config: a YAML file or a shipped config's name, e.g. tiny_synth "
        "(default: the sweep file's `config`, if any)",
    )
    add_set_option(
        p,
        "override a base config value for every trial (repeatable; YAML values)",
    )
    p.add_argument("--name", help="the sweep's name (default: the sweep file's `name`)")
    p.add_argument("--dry-run", action="store_true", help="print the trials, run nothing")
    p.set_defaults(func=cmd_tune)


def load(args: argparse.Namespace) -> Any:
    """The sweep, checked and expanded, with every trial's job config (no Ray)."""
    # deferred: `panet --help` imports this module; the runner loads Ray, torch, mlflow
    from pipeline.tune.runner import prepare

    sweep = load_sweep(args.sweep, args.name)
    job, base = base_job(base_config(sweep, args.config), parse_set(args.set))
    return prepare(sweep, expand(sweep), job, base)


def base_config(sweep: Any, config: str | None) -> Path:
    """The sweep's base job config file: `--config`, else the sweep file's `config` (a file
    beside the sweep file, a path, or a shipped config's name).

    Raises:
        ValueError: no config named, or no such file or shipped config.
    """
    if config:
        return resolve_config(config)
    if not sweep.config:
        raise ValueError(f"sweep {sweep.name!r} names no base config: pass --config")
    beside = Path(sweep.path).parent / sweep.config
    return beside if beside.is_file() else resolve_config(sweep.config)


def cmd_tune(args: argparse.Namespace) -> int:
    try:
        prepared = load(args)
        print(describe(prepared.sweep, prepared.trials, prepared.base))
        if args.dry_run:
            return 0
        from pipeline.tune.runner import run_sweep

        result = run_sweep(prepared)
    except (ValueError, FileNotFoundError) as err:
        print(f"panet tune: error: {err}", file=sys.stderr)
        return 2
    print_summary(result)
    return 1 if result["unfinished"] else 0


def print_summary(result: dict[str, Any]) -> None:
    """The results table, the best trial, the parent run's page and the UI command."""
    print("\n" + Path(result["paths"]["md"]).read_text())
    best = result["best"]
    if best is not None:
        print(f"best trial: {best.trial} (segm AP {100 * best.segm_AP:.1f}, step {best.steps})")
    if result["unfinished"]:
        print("the sweep was interrupted: run the same command again to resume it")
    print(f"results: {Path(result['paths']['md']).parent}")
    uri = result["tracking_uri"]
    print("\nOpen the MLflow UI:")
    print(f"  {tracking.ui_command(uri)}")
    print("then the sweep's run (its trials nested under it):")
    print(f"  {tracking.run_page_url(uri, result['parent_run_id'])}")
