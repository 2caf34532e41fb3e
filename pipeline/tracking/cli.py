"""`panet tracking sync`: deliver the MLflow records a job kept while its server was down."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.tracking.outbox import sync


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tracking",
        help="MLflow records a job could not deliver: send them to the server",
        description="A job logging to an MLflow server keeps every record (params, metrics, "
        "pictures, the run's end) in a journal under <job directory>/mlflow-outbox until the "
        "server takes it. When a job ends while the server is down it names that directory; "
        "`panet tracking sync DIR` delivers what is left, in order, once the server is back "
        "(re-running the same job does it too).",
    )
    commands = p.add_subparsers(dest="tracking_command", required=True)
    s = commands.add_parser(
        "sync",
        help="deliver an outbox's undelivered records",
        description="Deliver every journal of an MLflow outbox directory that no running job "
        "holds, in the order it was written; records the server refuses are kept beside the "
        "journal (*.rejected). Exit code 1 when records are left.",
    )
    s.add_argument("outbox", type=Path, help="the outbox directory, e.g. runs/my-job/mlflow-outbox")
    s.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to keep trying while the server does not answer",
    )
    s.set_defaults(func=cmd_sync)


def cmd_sync(args: argparse.Namespace) -> int:
    try:
        left = sync(args.outbox, args.timeout)
    except ValueError as err:
        print(f"panet tracking sync: error: {err}", file=sys.stderr)
        return 2
    if left:
        print(left, file=sys.stderr)
        return 1
    print(f"panet tracking sync: every record in {args.outbox} is delivered")
    return 0
