"""`panet eval`: COCO evaluation of a checkpoint on a shard directory, with Ray Train workers."""

from __future__ import annotations

import argparse
import sys

from pipeline.args import DefaultsFormatter, add_set_option, positive_int
from pipeline.config import parse_set


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `panet eval`."""
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
    add_set_option(
        p,
        "override the checkpoint's model config, e.g. the test-time tricks --set "
        "model.test.flip=true, model.test.scales=[224,256,288], model.test.box_vote=true",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    # deferred: `panet --help` imports this module; the eval job loads Ray, torch and pycocotools
    from pipeline.evaluate import job
    from pipeline.evaluate.scoring import format_metrics

    try:
        checkpoint = job.pick_checkpoint(args.checkpoint, best=args.best)
        metrics = job.run_eval_job(
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
