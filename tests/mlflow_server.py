"""A real `mlflow server` for tests: one web worker, no job consumers, SQLite, proxied artifacts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session: SIGTERM its group, SIGKILL after 15 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_server(
    root: Path,
    port: int,
    timeout: float = 90,
    artifacts: str | None = None,
    env: dict[str, str] | None = None,
):
    """Start `mlflow server` on `port` (its store in `root`) in its own session; wait for it.

    `artifacts`: the server's `--artifacts-destination` (default `root/artifacts`; an s3:// URI
    works with the AWS variables of this process's environment or of `env`, added to it).

    Returns:
        The server's process (stop it with `stop_group`).
    """
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts or str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "ab") as log:
        # Its own session, so the server and the uvicorn worker it spawns stop together.
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                stop_group(proc)
            raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()}")
        time.sleep(0.25)


@contextmanager
def mlflow_server(
    root: Path,
    timeout: float = 90,
    artifacts: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start `mlflow server` on a free localhost port; yield its URI; stop it (and its workers).
    The arguments are `start_server`'s."""
    port = free_port()
    proc = start_server(root, port, timeout, artifacts, env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


class RestartableServer:
    """An `mlflow server` a test stops and starts again: the same port, store and artifacts."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        self.proc = start_server(self.root, self.port, timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None
