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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
