"""The one call every `jobs.<name>` entrypoint makes: the `panet` CLI with its sub-command."""

from __future__ import annotations

import sys


def run(command: list[str], argv: list[str] | None = None) -> int:
    """Run `panet <command> <argv>` in this process and return its exit code.

    Args:
        command: the sub-command words, e.g. `["data", "convert"]`.
        argv: the job's own arguments; default the process's (`sys.argv[1:]`).
    """
    from pipeline.cli import main

    return main([*command, *(sys.argv[1:] if argv is None else argv)])
