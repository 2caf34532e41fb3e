"""The `panet` command line: one console script, one sub-command per job."""

from __future__ import annotations

import argparse
import sys

from pipeline.data.cli import positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panet", description="PANet instance segmentation on Ray: data, training, evaluation."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    from pipeline.data.cli import add_data_parser

    add_data_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    from pipeline.tune.cli import add_parser as add_tune_parser

    add_tune_parser(sub)
    from pipeline.submit import add_parser as add_submit_parser

    add_submit_parser(sub)
    from pipeline.predict.cli import add_parser as add_predict_parser

    add_predict_parser(sub)
    return parser


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except for flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def package_version() -> str:
    """The installed package's version ("unknown" when run from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("panet-on-ray")
    except PackageNotFoundError:
        return "unknown"


def add_train_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set solver.max_steps=100 (repeatable; YAML values)",
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


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="COCO evaluation (bbox and segm) of a checkpoint on a shard directory",
        description="Distributed inference over the shards (each image once), scored with "
        "pycocotools COCOeval on rank 0.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint (step-* directory or its state.pt), or a job directory: its latest "
        "checkpoint (--best: its best by segm AP)",
    )
    p.add_argument(
        "--best", action="store_true", help="with a job directory: its best checkpoint by segm AP"
    )
    p.add_argument("--data", required=True, help="shard directory of the images to evaluate")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray Train workers")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per batch and worker")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the checkpoint's model config, e.g. the test-time tricks --set "
        "model.test.flip=true, model.test.scales=[224,256,288], model.test.box_vote=true",
    )
    p.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_job_config, parse_set

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
            from pipeline.train.resume import with_free_name

            renamed = with_free_name(job)
            if renamed.name != job.name:
                print(f"[panet] training a new job: {renamed.name!r}", flush=True)
            job = renamed
        if args.dry_run:
            from pipeline.train.driver import preflight
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
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    from pipeline import tracking
    from pipeline.evaluate import format_metrics

    print("\nCOCO metrics of the last evaluation:")
    print(format_metrics(result["metrics"]))
    if result.get("checkpoint"):
        print(f"\nlatest checkpoint: {result['checkpoint']}")
    uri, run_id = result["tracking_uri"], result["run_id"]
    print("\nOpen the MLflow UI:")
    print(f"  {tracking.ui_command(uri)}")
    print(f"then this run's page:\n  {tracking.run_page_url(uri, run_id)}")


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.config import parse_set
    from pipeline.evaluate import format_metrics
    from pipeline.train.driver import run_eval

    try:
        checkpoint = pick_checkpoint(args.checkpoint, best=args.best)
        metrics = run_eval(
            checkpoint,
            args.data,
            args.workers,
            args.batch_size,
            args.gpu,
            model_overrides=parse_set(args.set),
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"panet eval: error: {err}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    return 0


def pick_checkpoint(path: str, best: bool = False) -> str:
    """The checkpoint `panet eval` reads: `path` itself, or one of a job directory's.

    Args:
        path: a checkpoint (`step-*` directory or its `state.pt`) or a job directory.
        best: from a job directory, the checkpoint with the highest segm AP (its
            `metrics.json`) instead of the latest.

    Returns:
        The checkpoint path; for a job directory the choice is printed.

    Raises:
        FileNotFoundError: nothing to evaluate there (naming the path).
    """
    import json
    from typing import Any

    from pipeline.storage import as_path
    from pipeline.train.checkpoints import STATE_FILE

    p = as_path(path)  # a local Path, or a StoragePath for s3:// / gs://
    if p.is_file() or (p / STATE_FILE).is_file() or not p.is_dir():
        return path  # a checkpoint, or missing: the loader names the file
    candidates: list[Any] = sorted(p.glob(f"step-*/{STATE_FILE}"))
    if not candidates:
        raise FileNotFoundError(
            f"{path!r} is neither a checkpoint nor a job directory with step-*/{STATE_FILE}"
        )

    def segm_ap(state_file: Any) -> float:
        try:
            return float(json.loads((state_file.parent / "metrics.json").read_text())["segm/AP"])
        except (OSError, ValueError, KeyError):
            return -1.0

    chosen = max(candidates, key=segm_ap) if best else candidates[-1]
    which = f"best by segm AP ({segm_ap(chosen):.3f})" if best else "latest"
    print(f"[panet] evaluating {chosen.parent} ({which} of {len(candidates)} in {p})", flush=True)
    return str(chosen.parent)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
