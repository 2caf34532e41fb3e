"""A job checked here, with its own command's parser, before anything is uploaded.

The arguments are parsed by the target sub-command's parser alone (built from that part's
`add_parser`), then a train job gets the same `preflight` as `panet train` and a sweep is
expanded as `panet tune --dry-run` would: a bad config, a path only this machine has, a
tracking store only one node could open, or missing data fails here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from panet_model.config import flatten
from pipeline import safe_yaml
from pipeline.args import AddParser, command_parser
from pipeline.config import load_job_config, parse_set, resolve_config
from pipeline.data.cli import add_parser as add_data_parser
from pipeline.evaluate.cli import add_parser as add_eval_parser
from pipeline.predict.cli import add_parser as add_predict_parser
from pipeline.submit import SubmitError
from pipeline.submit.runtime_env import STAGED_DIR, working_dir
from pipeline.train.cli import add_parser as add_train_parser
from pipeline.tune.cli import add_parser as add_tune_parser
from pipeline.tune.cli import base_config, load
from pipeline.tune.sweep import describe


class Command(NamedTuple):
    """The `panet` sub-command a `jobs.<name>` entrypoint runs."""

    words: list[str]  # e.g. ["data", "convert"]
    add_parser: AddParser  # its part's own `add_parser`: the job is checked with its parser


JOBS = {
    "convert": Command(["data", "convert"], add_data_parser),
    "train": Command(["train"], add_train_parser),
    "eval": Command(["eval"], add_eval_parser),
    "tune": Command(["tune"], add_tune_parser),
    "predict": Command(["predict"], add_predict_parser),
}
CONFIG_JOBS = ("train", "tune")  # jobs that take --config / --set
# Config keys that must name shared storage: a relative path would point into the uploaded
# working dir, which leaves data and runs out and is deleted with the job.
SHARED_KEYS = ("data.train", "data.val", "checkpoint.storage_path")


class CheckedJob(NamedTuple):
    """A job checked here and ready to submit."""

    args: list[str]  # the entrypoint's arguments
    tracking_uri: str  # the config's tracking URI, for the run link ("" if none)
    staged: dict[str, Path]  # uploaded copies: path in the working dir -> the file outside it


def check_job(args: argparse.Namespace) -> CheckedJob:
    """Validate the job here, as `panet <command>` would on the cluster.

    Raises:
        SubmitError: naming the file, key or argument that is wrong.
    """
    wd = working_dir(args)
    job_args = list(args.job_args)
    staged: dict[str, Path] = {}
    if args.job in CONFIG_JOBS:
        job_args = _config_args(args, wd, staged) + job_args
    elif args.config or args.set:
        raise SubmitError(f"--config/--set are for train and tune; pass {args.job}'s after --")
    command = JOBS[args.job]
    argv = [*command.words, *job_args]
    try:
        parsed = command_parser(command.add_parser).parse_args(argv)
    except SystemExit as err:  # argparse printed the reason
        raise SubmitError(f"`panet {' '.join(argv)}` is not a valid {args.job} job") from err
    tracking_uri = ""
    try:
        if args.job == "train":
            tracking_uri = _check_train(args, parsed)
        elif args.job == "tune":
            tracking_uri = _check_tune(parsed)
    except (ValueError, FileNotFoundError) as err:
        raise SubmitError(str(err)) from err
    return CheckedJob(job_args, tracking_uri, staged)


def _config_args(args: argparse.Namespace, wd: Path, staged: dict[str, Path]) -> list[str]:
    """--config and --set for the entrypoint; a config outside the working dir is staged."""
    out = []
    if args.config:
        try:
            config = resolve_config(args.config).resolve()
        except ValueError as err:
            raise SubmitError(str(err)) from err
        try:
            rel = config.relative_to(wd).as_posix()
        except ValueError:
            # Uploaded beside the project under a name of its content, so two jobs submitted
            # at once from the same directory never swap configs.
            digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12]
            rel = f"{STAGED_DIR}/{config.stem}-{digest}.yaml"
            staged[rel] = config
        out += ["--config", rel]
    for item in args.set:
        out += ["--set", item]
    return out


def _check_tune(parsed: argparse.Namespace) -> str:
    """The sweep expanded as `panet tune --dry-run` would, and its base config checked for a
    cluster (unless the job is a dry run)."""
    prepared = load(parsed)
    print(
        f"[submit] the sweep:\n{describe(prepared.sweep, prepared.trials, prepared.base)}",
        flush=True,
    )
    if not parsed.dry_run:
        _check_cluster_config(base_config(prepared.sweep, parsed.config), parsed.set)
    return prepared.base_job.tracking.uri


def _check_cluster_config(config: Path | None, sets: list[str]) -> None:
    """Every key a cluster job cannot use, in one message: local or relative paths where
    shared storage is needed, and a tracking store that only one node could open.

    Raises:
        ValueError: listing each such key.
    """
    raw = flatten(safe_yaml.load_file(config, "config file") or {}) if config else {}
    raw.update(parse_set(sets))
    problems = []
    for key in SHARED_KEYS:
        value = str(raw.get(key, "") or "")
        if not value or ("://" not in value and not os.path.isabs(value)):
            problems.append(f"{key!r} is {value or 'unset'!r}")
    shared = (
        "an absolute path on shared storage or a URI (s3://, gs://), not a path inside the "
        "working dir"
    )
    message = f"config keys {', '.join(problems)}: a job needs {shared}" if problems else ""
    uri = str(raw.get("tracking.uri", "") or "").strip()
    if _local_store(uri):
        store = f"{uri!r}" if uri else "unset (a SQLite file under checkpoint.storage_path)"
        message += "; " if message else ""
        message += (
            f"config key 'tracking.uri' is {store}: MLflow files only the job's own node could "
            "open; name an MLflow server every node reaches, e.g. --set "
            "tracking.uri=http://mlflow:5000 (this shell's MLFLOW_TRACKING_URI is not sent "
            "with the job)"
        )
    if message:
        raise ValueError(message)


def _local_store(uri: str) -> bool:
    """True for an MLflow store in local files: none named (SQLite), sqlite:, file: or a path."""
    return not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _check_train(args: argparse.Namespace, parsed: argparse.Namespace) -> str:
    config = resolve_config(args.config) if args.config else None
    # parsed.set: submit's --set and any after `--`, in the order the job applies them.
    job = load_job_config(config, parse_set(parsed.set))
    if not parsed.dry_run:  # a dry run on the cluster writes nothing
        _check_cluster_config(config, parsed.set)
    if not args.no_data_check:
        # deferred: `panet --help` imports this module; preflight loads Ray, torch
        from pipeline.train.preflight import preflight

        try:
            plan = preflight(job)
        except ValueError as err:
            raise ValueError(
                f"{err} (from here; if the data exists only on the cluster, pass --no-data-check)"
            ) from err
        print(
            f"[submit] config and data OK: {plan.train_rows} training images, "
            f"{plan.steps_per_epoch} steps/epoch",
            flush=True,
        )
    return job.tracking.uri
