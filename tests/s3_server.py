"""An S3-compatible server for tests: moto's server mode on a free localhost port.

Clients reach it through the standard AWS environment variables (`AWS_ENDPOINT_URL`, keys,
region), which pyarrow.fs, Ray Data, Ray Train, boto3 and MLflow all read.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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


class Outage:
    """A TCP relay in front of a server: the storage outage a test switches on and off.

    Clients talk to `endpoint`; `cut()` resets every open connection (an upload in flight
    fails mid-stream) and refuses new ones, `restore()` listens again on the same port. The
    server behind it keeps its objects, as a real object store does through a network outage.
    """

    def __init__(self, target: str) -> None:
        self._target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bytes_up = 0  # bytes relayed from clients to the server
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: a reset, as a dead server's host sends

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self._target)
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if up:
                    self.bytes_up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
