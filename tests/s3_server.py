"""An S3-compatible server for tests: moto's server mode on a free localhost port.

Clients reach it through the standard AWS environment variables (`AWS_ENDPOINT_URL`, keys,
region), which pyarrow.fs, Ray Data, Ray Train, boto3 and MLflow all read.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.mlflow_server import free_port, stop_group


def s3_env(endpoint: str) -> dict[str, str]:
    """The AWS variables that point every S3 client at `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextmanager
def s3_server(
    root: Path, buckets: tuple[str, ...] = ("panet",), timeout: float = 60
) -> Iterator[dict]:
    """Start `moto_server` with `buckets`; yield its AWS env vars; stop it on exit.

    Args:
        root: a directory for the server's log.
        buckets: buckets created before the yield.
        timeout: seconds to wait for the server.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = root / "moto.log"
    cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start:\n{log_path.read_text()}")
                time.sleep(0.25)
            env = s3_env(endpoint)
            for bucket in buckets:
                req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
                urllib.request.urlopen(req, timeout=5).close()
            yield env
        finally:
            stop_group(proc)
