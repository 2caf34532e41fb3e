"""The servers `panet` starts listen on 127.0.0.1 only: the local Ray instance (dashboard,
GCS, raylet, workers, agents, metrics) and the MLflow server of the printed UI command.

Each test starts the real server, lists the TCP sockets its processes listen on (from /proc),
and connects to every port at 127.0.0.1 (accepted) and at this machine's other addresses
(refused): its network interfaces' and 127.0.0.2, which reaches a socket bound to every
interface but not one bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than 127.0.0.1, plus 127.0.0.2 (always on `lo`)."""
    found = {"127.0.0.2"}
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        found |= {line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line}
    except FileNotFoundError:  # no iproute2: the address of the default route, if any
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.connect(("198.51.100.1", 9))  # UDP: nothing is sent
            found.add(s.getsockname()[0])
    return sorted(found - {"127.0.0.1"})


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc/net/tcp{,6}: the address as 32-bit words in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(port, 16)


def listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    owner = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN; field 9: the inode
                out.append((owner[fields[9]], *_address(fields[1])))
    return out


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def assert_loopback_only(root: int, expect_ports: set[int]) -> list[tuple[int, str, int]]:
    sockets = listening(process_tree(root))
    ports = {port for _, _, port in sockets}
    assert expect_ports <= ports, (expect_ports, sockets)
    wide = [s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not wide, f"listening beyond the loopback: {wide}"
    others = other_addresses()
    for port in sorted(ports):
        assert reachable("127.0.0.1", port), port
        assert not [host for host in others if reachable(host, port)], (port, others)
    return sockets


def test_the_widest_bind_would_be_seen() -> None:
    """The check itself: a socket on every interface is listed and reached at the others."""
    with socket.socket() as wide:
        wide.bind(("0.0.0.0", 0))
        wide.listen()
        port = wide.getsockname()[1]
        assert (os.getpid(), "0.0.0.0", port) in listening([os.getpid()])
        assert all(reachable(host, port) for host in other_addresses())
    with socket.socket() as narrow:
        narrow.bind(("127.0.0.1", 0))
        narrow.listen()
        assert not reachable("127.0.0.2", narrow.getsockname()[1])


RAY_SCRIPT = """
import sys, ray
from pipeline import ray_session
url = ray_session.start_local(1, state_api=True)
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up, and its gRPC server
print(url, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""


@pytest.mark.ray
def test_the_local_ray_instance_listens_on_the_loopback_only() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-c", RAY_SCRIPT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        dashboard = int(url.rsplit(":", 1)[1])
        time.sleep(3)  # the agents' servers come up beside the raylet's
        sockets = assert_loopback_only(proc.pid, {dashboard})
        assert len(sockets) >= 6, sockets  # GCS, raylet, dashboard, agents, driver, worker
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_printed_mlflow_ui_command_listens_on_the_loopback_only(tmp_path: Path) -> None:
    from pipeline import tracking
    from tests.mlflow_server import free_port, stop_group

    port = free_port()
    command = tracking.ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", port=port)
    words = shlex.split(command)  # VAR=value ... mlflow server ... --host 127.0.0.1 ...
    assignments = [w for w in words if re.fullmatch(r"[A-Z_]+=.*", w)]
    env = {**os.environ, **dict(w.split("=", 1) for w in assignments)}
    args = words[len(assignments) :]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.25)
        assert_loopback_only(proc.pid, {port})
    finally:
        stop_group(proc)
