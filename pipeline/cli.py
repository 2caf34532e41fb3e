"""The `panet` command line: one console script, one sub-command per job."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panet", description="PANet instance segmentation on Ray: data, training, evaluation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from pipeline.data.cli import add_data_parser

    add_data_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    from pipeline.submit import add_parser as add_submit_parser

    add_submit_parser(sub)
    return parser


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train PANet with Ray Train, evaluate with pycocotools, track in MLflow",
        description="Train on the shards named in the config. Re-running the same job name "
        "resumes it from its last checkpoint and logs into the same MLflow run.",
    )
    p.add_argument("--config", help="YAML job config (see jobs/configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set solver.max_steps=100 (repeatable; YAML values)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate the config and data, then stop")
    p.set_defaults(func=cmd_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="COCO evaluation (bbox and segm) of a checkpoint on a shard directory",
        description="Distributed inference over the shards (each image once), scored with "
        "pycocotools COCOeval on rank 0.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or its state.pt")
    p.add_argument("--data", required=True, help="shard directory of the images to evaluate")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--batch-size", type=int, default=2, help="images per batch and worker")
    p.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_job_config, parse_set

    try:
        job = load_job_config(args.config, parse_set(args.set))
        if args.dry_run:
            from pipeline.train.driver import preflight

            plan = preflight(job)
            print(
                f"config and data OK: {plan.train_rows} training images, {plan.steps_per_epoch} steps/epoch"
            )
            return 0
        from pipeline.train.driver import run_training

        result = run_training(job)
    except (ValueError, FileNotFoundError) as err:
        print(f"panet train: error: {err}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    from pipeline.evaluate import format_metrics
    from pipeline.tracking import runs as tracking

    print("\nCOCO metrics of the last evaluation:")
    print(format_metrics(result["metrics"]))
    if result.get("checkpoint"):
        print(f"\nlatest checkpoint: {result['checkpoint']}")
    uri, run_id = result["tracking_uri"], result["run_id"]
    print("\nOpen the MLflow UI:")
    print(f"  {tracking.ui_command(uri)}")
    print(f"then this run's page:\n  {tracking.run_page_url(uri, run_id)}")


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import format_metrics
    from pipeline.train.driver import run_eval

    try:
        metrics = run_eval(args.checkpoint, args.data, args.workers, args.batch_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"panet eval: error: {err}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
