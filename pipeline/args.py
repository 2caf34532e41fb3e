"""Argument helpers every part's `cli.py` may use; this module imports no part of `pipeline`.

A part's `cli.py` holds `add_parser(sub)`; `pipeline/cli.py` (the `panet` command), the
`jobs/` entrypoints and `panet submit`'s checks build their parsers from those functions with
`command_parser`, so no part has to import the registry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

# A part's `add_parser(sub)`: adds its sub-command to the top-level `add_subparsers()` object.
AddParser = Callable[[argparse._SubParsersAction], object]


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except for flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def package_version() -> str:
    """The installed package's version ("unknown" when run from an uninstalled tree)."""
    try:
        return version("panet-on-ray")
    except PackageNotFoundError:
        return "unknown"


def top_parser() -> argparse.ArgumentParser:
    """The `panet` parser without sub-commands (`--help`, `--version`)."""
    parser = argparse.ArgumentParser(
        prog="panet", description="PANet instance segmentation on Ray: data, training, evaluation."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def command_parser(*add_parsers: AddParser) -> argparse.ArgumentParser:
    """The `panet` parser with the sub-commands the given `add_parser` functions add.

    With every part's `add_parser` this is the `panet` command; with one, the parser of that
    sub-command alone, as a job entrypoint or `panet submit`'s check parses it: the same
    options, defaults, errors and `prog` ("panet train") as `panet` itself.
    """
    parser = top_parser()
    sub = parser.add_subparsers(dest="command", required=True)
    for add in add_parsers:
        add(sub)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen sub-command's `func`; returns its exit code."""
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set KEY=VALUE` of every command that overrides config values."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)
