"""The one call every `jobs.<name>` entrypoint makes: its `panet` sub-command, parsed alone."""

from __future__ import annotations

import sys

from pipeline.args import AddParser, command_parser, run_command


def run(add_parser: AddParser, command: list[str], argv: list[str] | None = None) -> int:
    """Run `panet <command> <argv>` in this process and return its exit code.

    Args:
        add_parser: the part's `add_parser`, which declares the sub-command (the parser is
            `panet`'s with that sub-command alone: same options, errors and help).
        command: the sub-command words, e.g. `["data", "convert"]`.
        argv: the job's own arguments; default the process's (`sys.argv[1:]`).
    """
    parser = command_parser(add_parser)
    return run_command(parser, [*command, *(sys.argv[1:] if argv is None else argv)])
