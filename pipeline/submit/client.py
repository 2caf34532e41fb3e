"""The Ray job server: its address, the client, a job's logs, status, stop and the list.

Authentication is Ray's own: with `RAY_AUTH_MODE=token`, `JobSubmissionClient` sends the token
from `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, as
`ray job submit` does.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from typing import Any

from pipeline import tracking
from pipeline.submit import SubmitError

RUN_LINE = re.compile(r"MLflow run ([0-9a-f]{32})")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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
    # deferred: `panet --help` imports this module (via `panet submit`); Ray only to submit
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
            f"cannot reach the job server at {address}: {first_line(err).rstrip('.')}{hint}"
        ) from err


def first_line(err: BaseException) -> str:
    """An error's first line (or its type's name), cut to 400 characters for a one-line message."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:400]


def dashboard_link(client: Any, job_id: str) -> str:
    """The job's page in the Ray dashboard."""
    return f"{client.get_address().rstrip('/')}/#/jobs/{job_id}"


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
        raise SubmitError(f"job {job_id}: cannot read its logs: {first_line(err)}") from err
    status = _final_status(client, job_id)
    print(f"\n[submit] job {job_id}: {status}", flush=True)
    print(f"[submit] dashboard: {link}", flush=True)
    if run_ids:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri:
            print(f"[submit] MLflow run: {tracking.run_page_url(uri, run_ids[-1])}", flush=True)
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
        raise SubmitError(f"cannot stop job {job_id}: {first_line(err)}") from err
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
