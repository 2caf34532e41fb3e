"""`panet train`: train on the shards a job config names, with Ray Train, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys

from pipeline import tracking
from pipeline.args import DefaultsFormatter, add_set_option
from pipeline.config import load_job_config, parse_set


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `panet train`."""
    p = sub.add_parser(
        "train",
        help="train PANet with Ray Train, evaluate with pycocotools, track in MLflow",
        description="Train on the shards named in the config. Re-running the same job name "
        "with the same config resumes it from its last checkpoint and logs into the same MLflow "
        "run; with a changed config it is refused unless --resume or --new-name says which.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument(
        "--config", help="YAML job config: a file, or a shipped config's name, e.g. tiny_synth"
    )
    add_set_option(
        p,
        "override a config value, e.g. --set solver.max_steps=100 (repeatable; YAML values)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, weights, data and resources without starting Ray, then stop",
    )
    p.add_argument(
        "--skip-resource-check",
        action="store_true",
        help="start even if the cluster cannot hold the workers now (= --set "
        "ray.check_resources=false; an autoscaling cluster is only warned about anyway)",
    )
    existing = p.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the job of this name even if its config changed (the changes are printed "
        "and recorded in MLflow); a job never resumes on other data",
    )
    existing.add_argument(
        "--new-name",
        action="store_true",
        help="train a new job named <name>-2 (-3, ...) when a job of this name exists",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        sets = parse_set(args.set)
        if args.skip_resource_check:
            sets["ray.check_resources"] = False
        if args.config is None and not {"data.train", "data.val"} <= sets.keys():
            raise ValueError(
                "no job config: pass --config FILE or a shipped config's name (e.g. "
                "tiny_synth), or set data.train and data.val with --set"
            )
        job = load_job_config(args.config, sets)
        if args.new_name:
            # deferred: `panet --help` imports this module; training loads Ray, torch, mlflow
            from pipeline.train.resume import with_free_name

            renamed = with_free_name(job)
            if renamed.name != job.name:
                print(f"[panet] training a new job: {renamed.name!r}", flush=True)
            job = renamed
        if args.dry_run:
            from pipeline.train.preflight import preflight
            from pipeline.train.resume import describe

            plan = preflight(job, allow_changes=args.resume)
            if plan.changes:
                print(f"[panet] job {job.name!r} resumes with changes: {describe(plan.changes)}")
            print(
                f"config and data OK: {plan.train_rows} training images, {plan.steps_per_epoch} steps/epoch"
            )
            return 0
        from pipeline.train.driver import run_training

        result = run_training(job, allow_changes=args.resume)
    except (ValueError, FileNotFoundError) as err:
        print(f"panet train: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from pipeline.train.capacity import CapacityError

        if not isinstance(err, CapacityError):
            raise
        print(f"panet train: {err}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    from pipeline.evaluate.scoring import format_metrics

    print("\nCOCO metrics of the last evaluation:")
    print(format_metrics(result["metrics"]))
    if result.get("checkpoint"):
        print(f"\nlatest checkpoint: {result['checkpoint']}")
    uri, run_id = result["tracking_uri"], result["run_id"]
    print("\nOpen the MLflow UI:")
    print(f"  {tracking.ui_command(uri)}")
    print(f"then this run's page:\n  {tracking.run_page_url(uri, run_id)}")
