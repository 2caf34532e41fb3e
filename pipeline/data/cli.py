"""`panet data ...`: synth, convert {coco,mvd,cityscapes}, inspect.

Converters and the synthetic generator are imported when their command runs, so `panet --help`
stays fast. User errors (missing file, bad layout, OUT in the way, a bad record under --strict)
print one line and exit 2; a failed `inspect --verify` exits 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.args import non_negative_int, positive_int
from pipeline.data.layout import DEFAULT_SHARD_SIZE


def _user_errors(command: str) -> Callable[[Callable[[argparse.Namespace], int]], Any]:
    """Turn the errors a user can fix into one line on stderr and exit code 2 (no traceback)."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            # deferred: `panet --help` imports this module; each command loads pyarrow, PIL, Ray as it needs
            from pipeline.data.manifest import DataError

            try:
                return fn(args)
            except (DataError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
                print(f"panet {command}: error: {e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"panet {command}: interrupted; rerun with --resume", file=sys.stderr)
                return 130

        return run

    return wrap


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data` and its sub-commands to the `panet` parser.

    Args:
        subparsers: the top-level `add_subparsers()` object.

    Returns:
        The `data` parser.
    """
    # One flat block of argparse declarations per sub-command, in `--help` order: long, but
    # each block reads on its own and splitting them would only scatter the options.
    data = subparsers.add_parser(
        "data",
        help="make, convert and inspect data sets",
        description="Synthetic data, converters to sharded Parquet records, shard inspection.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{synth,convert,inspect}")

    synth = sub.add_parser(
        "synth",
        help="write a synthetic data set in a real COCO or MVD layout",
        description="Render a synthetic shapes data set and write it as COCO instances or MVD.",
    )
    synth.add_argument("--format", choices=("coco", "mvd"), required=True, help="layout to write")
    synth.add_argument("--images", type=non_negative_int, required=True, help="number of images")
    synth.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--split",
        default="train",
        help="split name in the paths (default train); write a validation set with --split val "
        "(same --out, other scenes); `convert mvd --split` / COCO's instances_<split>.json match it",
    )
    synth.add_argument("--out", type=Path, required=True, help="output data set root")
    synth.set_defaults(func=_cmd_synth)

    convert = sub.add_parser(
        "convert",
        help="convert a data set to sharded Parquet records",
        description=(
            "Convert COCO, Mapillary Vistas or Cityscapes to *.parquet shards plus manifest.json. "
            "Bad images/annotations are reported and skipped (--strict: fail on the first)."
        ),
    )
    fmt = convert.add_subparsers(dest="format", required=True, metavar="{coco,mvd,cityscapes}")

    coco = fmt.add_parser(
        "coco",
        help="COCO instances: annotations/instances_<split>.json + image folder",
        description="Convert COCO instances (polygons, RLE, iscrowd) to shards.",
    )
    coco.add_argument("--annotations", type=Path, required=True, help="instances_<split>.json")
    coco.add_argument("--images", type=Path, required=True, help="folder of the split's images")
    _add_convert_options(coco)
    coco.set_defaults(func=_cmd_convert_coco)

    mvd = fmt.add_parser(
        "mvd",
        help="Mapillary Vistas v1.2/v2.0: <root>/<split>/images + 16-bit instance PNGs",
        description="Convert a Mapillary Vistas split (thing labels of the config) to shards.",
    )
    mvd.add_argument("--root", type=Path, required=True, help="data set root (config_*.json)")
    mvd.add_argument(
        "--split",
        required=True,
        help="split folder: training or validation in the MVD release; the --split given to "
        "`panet data synth` (default train) for a synthetic set",
    )
    mvd.add_argument(
        "--version",
        choices=("v1.2", "v2.0"),
        default=None,
        help="label set (default: the one whose config exists; v1.2 if both)",
    )
    _add_convert_options(mvd)
    mvd.set_defaults(func=_cmd_convert_mvd)

    city = fmt.add_parser(
        "cityscapes",
        help="Cityscapes gtFine: leftImg8bit + *_gtFine_instanceIds.png",
        description="Convert a Cityscapes split (8 thing classes, crowd regions) to shards.",
    )
    city.add_argument("--root", type=Path, required=True, help="root with leftImg8bit/, gtFine/")
    city.add_argument("--split", required=True, help="train, val or test")
    _add_convert_options(city)
    city.set_defaults(func=_cmd_convert_cityscapes)

    inspect = sub.add_parser(
        "inspect",
        help="summarise a shard directory; --verify re-checks every shard",
        description="Counts, categories, image sizes, bytes and skipped records of a shard dir.",
    )
    inspect.add_argument(
        "out", help="shard directory (holding manifest.json): a path or an s3:// / gs:// URI"
    )
    inspect.add_argument(
        "--verify", action="store_true", help="re-hash every shard, check row counts and schema"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_cmd_inspect)
    return data


def _add_convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="output shard directory: a path, or an s3:// / gs:// URI (staged locally, uploaded)",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=DEFAULT_SHARD_SIZE,
        metavar="ROWS",
        help=f"images per shard (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="worker processes (default: all cores; 1: no pool)",
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad image/annotation")
    p.add_argument(
        "--resume", action="store_true", help="continue a killed conversion in --out (keeps shards)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines or summary")


def _options(args: argparse.Namespace) -> dict:
    return {
        "shard_size": args.shard_size,
        "workers": args.workers,
        "strict": args.strict,
        "resume": args.resume,
        "progress": not args.quiet,
    }


def _check_yield(command: str, out: str, manifest: dict) -> int:
    """Exit 2 with a hint when the conversion kept nothing or skipped most images."""
    from pipeline.data.inspect import yield_problem

    problem = yield_problem(manifest)
    if problem is None:
        return 0
    print(f"panet {command}: error: {out}: {problem}", file=sys.stderr)
    return 2


@_user_errors("data synth")
def _cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.data.synth import write_synthetic

    try:
        out = write_synthetic(args.format, args.images, args.seed, args.out, split=args.split)
    except ValueError as e:  # bad parameter values, as documented by write_synthetic
        print(f"panet data synth: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


@_user_errors("data convert coco")
def _cmd_convert_coco(args: argparse.Namespace) -> int:
    from pipeline.data.convert_coco import convert_coco

    manifest = convert_coco(args.annotations, args.images, args.out, **_options(args))
    return _check_yield("data convert coco", args.out, manifest)


@_user_errors("data convert mvd")
def _cmd_convert_mvd(args: argparse.Namespace) -> int:
    from pipeline.data.convert_mvd import convert_mvd

    manifest = convert_mvd(args.root, args.split, args.out, version=args.version, **_options(args))
    return _check_yield("data convert mvd", args.out, manifest)


@_user_errors("data convert cityscapes")
def _cmd_convert_cityscapes(args: argparse.Namespace) -> int:
    from pipeline.data.convert_cityscapes import convert_cityscapes

    manifest = convert_cityscapes(args.root, args.split, args.out, **_options(args))
    return _check_yield("data convert cityscapes", args.out, manifest)


@_user_errors("data inspect")
def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.data.inspect import format_inspect, inspect_shards

    report = inspect_shards(args.out, verify=args.verify)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_inspect(report))
    if report["problems"]:
        for problem in report["problems"]:
            print(f"panet data inspect: verify failed: {problem}", file=sys.stderr)
        return 1
    return 0
