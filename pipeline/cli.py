"""The `panet` command: a registry of sub-commands, one per part.

Each part's `cli.py` declares its own sub-command in `add_parser(sub)`; this module only lists
them. Nothing imports it: a job entrypoint or `panet submit` builds the parser of one
sub-command from that part's `add_parser` (`pipeline.args.command_parser`).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.args import command_parser, run_command
from pipeline.data.cli import add_parser as add_data_parser
from pipeline.evaluate.cli import add_parser as add_eval_parser
from pipeline.predict.cli import add_parser as add_predict_parser
from pipeline.submit.cli import add_parser as add_submit_parser
from pipeline.tracking.cli import add_parser as add_tracking_parser
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
        add_tracking_parser,
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
