"""`panet submit`: its options, the job name, and the order of the steps.

The cluster's address is resolved first, then the job is checked here (`check.py`), so no
cluster named, a bad config, a path only this machine has, a tracking store only one node
could open, or missing data fails before anything is uploaded (`runtime_env.py`) and submitted
(`client.py`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import NoReturn

from pipeline.args import add_set_option
from pipeline.submit import SubmitError
from pipeline.submit.check import JOBS, check_job
from pipeline.submit.client import (
    connect,
    dashboard_link,
    first_line,
    list_jobs,
    resolve_address,
    stop,
    stream,
)
from pipeline.submit.runtime_env import runtime_env, staged_files, working_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `panet submit`."""
    p = sub.add_parser(
        "submit",
        parents=[_options()],
        help="submit a job to a Ray cluster, stream its logs, print its links",
        usage=f"panet submit [OPTIONS] {{{','.join(JOBS)}}} [OPTIONS] [-- JOB ARGS]\n"
        "       panet submit --list | --logs ID | --stop ID [--address URL]",
        description="Check the job locally, upload the project (see .rayignore), and run "
        "`python -m jobs.<job>` on the cluster. Job arguments other than --config/--set go "
        "after `--`. Token authentication: export RAY_AUTH_MODE=token and put the cluster's "
        "token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH, or RAY_AUTH_TOKEN).",
    )
    p.add_argument(
        "job",
        nargs=argparse.REMAINDER,
        metavar="JOB",
        help=f"the jobs.<JOB> entrypoint: one of {', '.join(JOBS)}",
    )
    p.set_defaults(func=cmd_submit)


class _OptionParser(argparse.ArgumentParser):
    """Options after the job name: a bad one is a SubmitError, not an exit."""

    def error(self, message: str) -> NoReturn:
        raise SubmitError(message)


def _options() -> argparse.ArgumentParser:
    """`panet submit`'s options, accepted before and after the job name."""
    p = _OptionParser(add_help=False, prog="panet submit")
    p.add_argument(
        "--address",
        help="the cluster's dashboard, e.g. http://127.0.0.1:8265 "
        "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)",
    )
    p.add_argument(
        "--config",
        help="train/tune: the job config, a file (uploaded with the job) or a shipped config's "
        "name, e.g. coco_panet_r50",
    )
    add_set_option(p, "train/tune: override")
    p.add_argument(
        "--no-pip",
        action="store_true",
        help="install nothing: the cluster's image already holds the pinned versions",
    )
    p.add_argument(
        "--working-dir", help="directory uploaded (default: the project checkout panet runs from)"
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow server as your browser reaches it, for the run link "
        "(default: the config's tracking.uri)",
    )
    p.add_argument(
        "--no-data-check",
        action="store_true",
        help="validate the config but not the data (paths that exist only on the cluster)",
    )
    p.add_argument("--no-wait", action="store_true", help="submit and return; do not stream")
    p.add_argument("--submission-id", help="job id to use (default: Ray generates one)")
    ops = p.add_mutually_exclusive_group()
    ops.add_argument("--stop", metavar="ID", help="stop a running job")
    ops.add_argument("--logs", metavar="ID", help="print a job's logs (follows a running job)")
    ops.add_argument("--list", action="store_true", help="list the cluster's jobs")
    return p


def split_job(args: argparse.Namespace) -> argparse.Namespace:
    """`job` holds everything from the job name on: options before `--` are submit's own
    (parsed into `args`), the rest the job's (`args.job_args`); `args.job` becomes the name."""
    tokens = list(args.job or [])
    args.job, args.job_args = (tokens[0] if tokens else None), []
    if args.job is None:
        return args
    if args.job not in JOBS:
        raise SubmitError(f"unknown job {args.job!r}: expected one of {', '.join(JOBS)}")
    rest = tokens[1:]
    cut = rest.index("--") if "--" in rest else len(rest)
    before, args.job_args = rest[:cut], rest[cut + 1 :]
    _options().parse_args(before, namespace=args)  # keeps the values given before the job name
    return args


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        args = split_job(args)
        if args.list or args.logs or args.stop:
            client = connect(resolve_address(args.address))
            if args.list:
                return list_jobs(client)
            if args.logs:
                return stream(client, args.logs, dashboard_link(client, args.logs), None)
            return stop(client, args.stop)
        if args.job is None:
            raise SubmitError("name a job (convert, train, eval, tune, predict) or use --list")
        return submit(args)
    except SubmitError as err:
        print(f"panet submit: error: {err}", file=sys.stderr)
        return 2


def submit(args: argparse.Namespace) -> int:
    """Check, submit, then stream the logs until the job ends (unless --no-wait)."""
    address = resolve_address(args.address)  # no cluster named: said before any slow check
    job = check_job(args)
    env = runtime_env(args)
    client = connect(address)
    entrypoint = " ".join(["python", "-m", f"jobs.{args.job}", *map(shlex.quote, job.args)])
    with staged_files(working_dir(args), job.staged):
        try:
            job_id = client.submit_job(  # uploads the working dir before it returns
                entrypoint=entrypoint,
                runtime_env=env,
                submission_id=args.submission_id,
                metadata={"panet_job": args.job},
            )
        except Exception as err:
            raise SubmitError(f"the job server refused the job: {first_line(err)}") from err
    link = dashboard_link(client, job_id)
    print(f"[submit] job id: {job_id}", flush=True)
    print(f"[submit] dashboard: {link}", flush=True)
    print(f"[submit] entrypoint: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"[submit] follow it with: panet submit --logs {job_id}", flush=True)
        return 0
    return stream(client, job_id, link, args.tracking_uri or job.tracking_uri)
