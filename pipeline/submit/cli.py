"""`panet submit`: run a `jobs.<name>` entrypoint on a Ray cluster through its job server.

The cluster's address is resolved first, then the job's config is checked here (the same
`preflight` as `panet train`), so no cluster named, a bad config, a path only this machine has,
a tracking store only one node could open, or missing data fails before anything is uploaded.
The runtime env ships the project directory (minus what `.rayignore` leaves out: data, shards,
runs, `.venv`, caches), a config from outside it, and the dependencies pinned by
`constraints.txt` (or nothing, with `--no-pip`, on an image that holds them). Authentication is
Ray's own:
with `RAY_AUTH_MODE=token`, `JobSubmissionClient` sends the token from `RAY_AUTH_TOKEN`,
the file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, as `ray job submit` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import yaml

# Job name -> the `panet` sub-command its `jobs.<name>` entrypoint runs.
JOBS = {
    "convert": ["data", "convert"],
    "train": ["train"],
    "eval": ["eval"],
    "tune": ["tune"],
    "predict": ["predict"],
}
CONFIG_JOBS = ("train", "tune")  # jobs that take --config / --set
# Config keys that must name shared storage: a relative path would point into the uploaded
# working dir, which leaves data and runs out and is deleted with the job.
SHARED_KEYS = ("data.train", "data.val", "checkpoint.storage_path")
RUN_LINE = re.compile(r"MLflow run ([0-9a-f]{32})")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Where a config from outside the working dir is put for the upload (removed once uploaded).
STAGED_DIR = ".panet-submit"
# Installed on the cluster by `ray` itself: never reinstalled by a job's runtime env.
NOT_PIPPED = ("ray",)


class SubmitError(ValueError):
    """A problem found before or while talking to the job server; printed as one line."""


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
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="train/tune: override"
    )
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


def resolve_address(address: str | None) -> str:
    """The dashboard URL: the argument, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    address = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    )
    if not address:
        raise SubmitError(
            "no cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS (a local cluster: "
            "`ray start --head`, then --address http://127.0.0.1:8265)"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address!r}: expected the dashboard's http(s):// URL")
    return address.rstrip("/")


def connect(address: str) -> Any:
    """A `JobSubmissionClient`; Ray adds the token header when RAY_AUTH_MODE=token."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection refused, 401, wrong port: one line, not a traceback
        if "auth" in str(err).lower():
            hint = (
                " (token authentication: export RAY_AUTH_MODE=token and put the cluster's token "
                "in ~/.ray/auth_token, the file named by RAY_AUTH_TOKEN_PATH, or RAY_AUTH_TOKEN)"
            )
        else:
            hint = (
                "; is a Ray head running there? Start one with `ray start --head` (its job "
                "server listens on :8265), or forward a remote head's port, e.g. `kubectl -n "
                "panet port-forward service/panet-head-svc 8265:8265` (infra/README.md)"
            )
        raise SubmitError(
            f"cannot reach the job server at {address}: {_first_line(err).rstrip('.')}{hint}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:400]


def pinned_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """The project's dependencies with the versions of `constraints.txt` (ray left out).

    Args:
        root: the directory holding pyproject.toml and constraints.txt.

    Returns:
        pip requirement strings, e.g. `["torch==2.14.1", ..., "pyyaml>=6"]`.
    """
    try:
        import tomllib

        deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    except ImportError:  # Python 3.10: the installed package's own metadata
        from importlib.metadata import requires

        deps = [r for r in requires("panet-on-ray") or [] if "extra ==" not in r]
    pins: dict[str, str] = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[_dist_name(line)] = line
    out = []
    for dep in deps:
        name = _dist_name(dep)
        if name in NOT_PIPPED:
            continue
        out.append(pins.get(name, dep))
    return out


def _dist_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].strip().lower()


def working_dir(args: argparse.Namespace) -> Path:
    """The directory uploaded: --working-dir, else the checkout this `panet` runs from."""
    if args.working_dir:
        path = Path(args.working_dir).resolve()
        if not path.is_dir():
            raise SubmitError(f"--working-dir {str(path)!r} is not a directory")
        return path
    if not (PROJECT_ROOT / "pyproject.toml").is_file():  # an installed copy: site-packages
        raise SubmitError(
            "panet is installed, not run from a checkout: pass --working-dir (the directory to "
            "upload, e.g. your configs) and --no-pip if the cluster's image holds the project"
        )
    return PROJECT_ROOT


def runtime_env(args: argparse.Namespace) -> dict[str, Any]:
    """The job's runtime env: the working dir and, unless --no-pip, the pinned pip packages."""
    env: dict[str, Any] = {
        "working_dir": str(working_dir(args)),
        "env_vars": {"PYTHONUNBUFFERED": "1"},  # log lines reach the stream as they are printed
    }
    if not args.no_pip:
        if not (PROJECT_ROOT / "constraints.txt").is_file():
            raise SubmitError(
                "the pins to install are in a checkout's constraints.txt, and panet is installed: "
                "pass --no-pip (the cluster's image holds the project) or run from a checkout"
            )
        env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    return env


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
    from pipeline.cli import build_parser

    wd = working_dir(args)
    job_args = list(args.job_args)
    staged: dict[str, Path] = {}
    if args.job in CONFIG_JOBS:
        job_args = _config_args(args, wd, staged) + job_args
    elif args.config or args.set:
        raise SubmitError(f"--config/--set are for train and tune; pass {args.job}'s after --")
    argv = [*JOBS[args.job], *job_args]
    try:
        parsed = build_parser().parse_args(argv)
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
    from pipeline.config import resolve_config

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
    from pipeline.tune.cli import base_config, load
    from pipeline.tune.sweep import describe

    prepared = load(parsed)
    print(f"[submit] the sweep:\n{describe(prepared.sweep, prepared.trials)}", flush=True)
    if not parsed.dry_run:
        _check_cluster_config(base_config(prepared.sweep, parsed.config), parsed.set)
    return prepared.base_job.tracking.uri


def _check_cluster_config(config: Path | None, sets: list[str]) -> None:
    """Every key a cluster job cannot use, in one message: local or relative paths where
    shared storage is needed, and a tracking store that only one node could open.

    Raises:
        ValueError: listing each such key.
    """
    from panet_model.config import flatten
    from pipeline.config import parse_set

    raw = flatten(yaml.safe_load(config.read_text()) or {}) if config else {}
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
    from pipeline.config import load_job_config, parse_set, resolve_config

    config = resolve_config(args.config) if args.config else None
    # parsed.set: submit's --set and any after `--`, in the order the job applies them.
    job = load_job_config(config, parse_set(parsed.set))
    if not parsed.dry_run:  # a dry run on the cluster writes nothing
        _check_cluster_config(config, parsed.set)
    if not args.no_data_check:
        from pipeline.train.driver import preflight

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


def submit(args: argparse.Namespace) -> int:
    """Check, submit, then stream the logs until the job ends (unless --no-wait)."""
    address = resolve_address(args.address)  # no cluster named: said before any slow check
    job = check_job(args)
    env = runtime_env(args)
    client = connect(address)
    entrypoint = " ".join(["python", "-m", f"jobs.{args.job}", *map(_quote, job.args)])
    with staged_files(working_dir(args), job.staged):
        try:
            job_id = client.submit_job(  # uploads the working dir before it returns
                entrypoint=entrypoint,
                runtime_env=env,
                submission_id=args.submission_id,
                metadata={"panet_job": args.job},
            )
        except Exception as err:
            raise SubmitError(f"the job server refused the job: {_first_line(err)}") from err
    link = dashboard_link(client, job_id)
    print(f"[submit] job id: {job_id}", flush=True)
    print(f"[submit] dashboard: {link}", flush=True)
    print(f"[submit] entrypoint: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"[submit] follow it with: panet submit --logs {job_id}", flush=True)
        return 0
    return stream(client, job_id, link, args.tracking_uri or job.tracking_uri)


@contextlib.contextmanager
def staged_files(wd: Path, staged: dict[str, Path]) -> Iterator[None]:
    """Copy each staged file into the working dir for the upload, and remove the copies after."""
    made = []
    try:
        for rel, source in staged.items():
            target = wd / rel
            try:
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)
            except OSError as err:
                raise SubmitError(f"cannot put {source} into the working dir: {err}") from err
            made.append(target)
        yield
    finally:
        for target in made:
            target.unlink(missing_ok=True)
        for parent in {t.parent for t in made}:
            with contextlib.suppress(OSError):  # not empty: another submit is staging too
                parent.rmdir()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def dashboard_link(client: Any, job_id: str) -> str:
    """The job's page in the Ray dashboard."""
    return f"{client.get_address().rstrip('/')}/#/jobs/{job_id}"


def mlflow_link(tracking_uri: str, run_id: str) -> str:
    """The run's page in the MLflow UI (`tracking.run_page_url`)."""
    from pipeline import tracking

    return tracking.run_page_url(tracking_uri, run_id)


def stream(client: Any, job_id: str, link: str, tracking_uri: str | None) -> int:
    """Print the job's logs as they come; then its status and links.

    Returns:
        0 if the job succeeded, 1 otherwise.
    """
    run_ids: list[str] = []

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            run_ids.extend(m for m in RUN_LINE.findall(chunk) if m not in run_ids)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(
            f"\n[submit] stopped following; job {job_id} keeps running. "
            f"Stop it with: panet submit --stop {job_id}",
            flush=True,
        )
        return 130
    except Exception as err:
        raise SubmitError(f"job {job_id}: cannot read its logs: {_first_line(err)}") from err
    status = _final_status(client, job_id)
    print(f"\n[submit] job {job_id}: {status}", flush=True)
    print(f"[submit] dashboard: {link}", flush=True)
    if run_ids:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri:
            print(f"[submit] MLflow run: {mlflow_link(uri, run_ids[-1])}", flush=True)
        else:
            print(f"[submit] MLflow run id: {run_ids[-1]} (its page is in the log above)")
    return 0 if status == "SUCCEEDED" else 1


def _final_status(client: Any, job_id: str, timeout: float = 30) -> str:
    # The log stream closes as the job ends; its status may trail by a moment.
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def stop(client: Any, job_id: str, timeout: float = 60) -> int:
    """Stop a job and wait until Ray reports it stopped (or ended)."""
    try:
        client.stop_job(job_id)
    except Exception as err:
        raise SubmitError(f"cannot stop job {job_id}: {_first_line(err)}") from err
    status = _final_status(client, job_id, timeout)
    print(f"[submit] job {job_id}: {status}", flush=True)
    return 0 if status in TERMINAL else 1


def list_jobs(client: Any) -> int:
    """One line per job: id, status, start time, entrypoint."""
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print("no jobs")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        job_id = j.submission_id or j.job_id
        print(f"{job_id:<32} {str(j.status.value):<10} {started}  {j.entrypoint}")
    return 0
