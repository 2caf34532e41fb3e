"""The `panet` command: a registry of sub-commands, one per part.

Each part's `cli.py` declares its own sub-command in `add_parser(sub)`; this module only lists
them. Nothing imports it: a job entrypoint or `panet submit` builds the parser of one
sub-command from that part's `add_parser` (`pipeline.args.command_parser`).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.args import DefaultsFormatter, command_parser, positive_int, run_command
from pipeline.data.cli import add_parser as add_data_parser
from pipeline.predict.cli import add_parser as add_predict_parser
from pipeline.submit.cli import add_parser as add_submit_parser
from pipeline.train.cli import add_parser as add_train_parser
from pipeline.tune.cli import add_parser as add_tune_parser


def build_parser() -> argparse.ArgumentParser:
    """`panet` with every part's sub-command, in `--help` order."""
    return command_parser(
        add_data_parser,
        add_train_parser,
        add_eval_parser,
        add_tune_parser,
        add_submit_parser,
        add_predict_parser,
    )


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
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
