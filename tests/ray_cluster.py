"""A real local Ray cluster for tests: `ray start --head` with token authentication.

Every node is a `ray start --block` process in its own session, on free localhost ports and
its own temp dir; on exit only the processes of those sessions are stopped (never `ray stop`,
which stops every Ray process of the machine). The token comes from
`ray get-auth-token --generate` run with a private HOME, and reaches every client through
`RAY_AUTH_MODE=token` + `RAY_AUTH_TOKEN_PATH` in `RayCluster.env`, as Ray's own CLI reads it.

    with ray_cluster(num_cpus=4, extra_nodes=[NodeSpec(num_cpus=2, resources={"b": 1})]) as c:
        subprocess.run(["panet", "submit", ..., "--address", c.dashboard_url], env=c.env)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class NodeSpec:
    """One node of the test cluster."""

    num_cpus: int = 2  # logical CPUs
    resources: dict[str, float] = field(default_factory=dict)  # custom resources


@dataclass(frozen=True)
class RayCluster:
    """What a test needs to reach the cluster."""

    address: str  # GCS address, for `ray.init(address=...)` and `ray start --address`
    dashboard_url: str  # http://127.0.0.1:PORT, for JobSubmissionClient / `panet submit`
    env: dict[str, str]  # os.environ + token auth + the venv first on PATH
    token: str  # the cluster's authentication token
    temp_dir: Path  # the head's Ray temp dir (session logs under session_latest/)
    pids: tuple[int, ...] = ()  # the `ray start --block` process of each node
    nodes: Nodes | None = None  # the extra nodes: stop one (a lost node), start it again


class Nodes:
    """The extra nodes of a test cluster, to lose one mid-job and bring it back."""

    def __init__(self, procs: list[subprocess.Popen], start: Callable[[int], None]) -> None:
        self._procs = procs  # the cluster's list: [head, node0, node1, ...]
        self._start = start
        self.stopped: set[int] = set()
        self.paused: set[int] = set()

    def pause(self, i: int, only: str = "") -> None:
        """Hang extra node `i` without killing it: SIGSTOP its whole session (raylet, workers),
        or only its processes named `only` (e.g. "raylet": the workers run on)."""
        for pid in session_pids(self._procs[1 + i].pid):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                if not only or Path(f"/proc/{pid}/comm").read_text().strip() == only:
                    os.kill(pid, signal.SIGSTOP)
        self.paused.add(i)

    def resume(self, i: int) -> None:
        """SIGCONT every process of paused node `i`."""
        for pid in session_pids(self._procs[1 + i].pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused.discard(i)

    def exited(self, i: int) -> bool:
        """Whether every process of extra node `i`'s session has exited."""
        self._procs[1 + i].poll()  # reap the `ray start` process: a zombie counts as exited
        return not session_pids(self._procs[1 + i].pid)

    def stop(self, i: int) -> None:
        """Lose extra node `i` without warning: SIGKILL its whole session (raylet, workers)."""
        proc = self._procs[1 + i]
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        self.stopped.add(i)

    def start(self, i: int) -> None:
        """Start extra node `i` again (new ports, a new temp dir, the same resources)."""
        self._start(i)
        self.stopped.discard(i)

    def restore(self) -> None:
        """Resume every node a test left paused and start every node `stop` lost and a test
        left down (a failed test leaves the cluster whole for the next one)."""
        for i in sorted(self.paused):
            self.resume(i)
        for i in sorted(self.stopped):
            self.start(i)


def free_ports(n: int) -> list[int]:
    """`n` distinct free localhost ports (all bound at once, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env(token_path: Path) -> dict[str, str]:
    """The environment of the nodes and their clients: token auth on, the venv first on PATH."""
    env = dict(os.environ)
    for key in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
    ):
        env.pop(key, None)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's memory monitor counts every process of this shared machine and kills the
            # test's workers when other work fills it; the kernel's OOM killer still applies.
            "RAY_memory_monitor_refresh_ms": "0",
        }
    )
    return env


def generate_token(home: Path) -> tuple[str, Path]:
    """`ray get-auth-token --generate` with HOME=home: returns (token, its file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "get-auth-token", "--generate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    path = home / ".ray" / "auth_token"
    token = out.stdout.strip()
    if not token or path.read_text().strip() != token:
        raise RuntimeError(f"ray get-auth-token --generate gave no token:\n{out.stderr}")
    return token, path


def _node_ports(flags: Sequence[str]) -> list[str]:
    ports = free_ports(len(flags))
    return [f"--{flag}={port}" for flag, port in zip(flags, ports)]


def _resources_flags(spec: NodeSpec) -> list[str]:
    out = [f"--num-cpus={spec.num_cpus}"]
    if spec.resources:
        out.append(f"--resources={json.dumps(spec.resources)}")
    return out


NODE_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
HEAD_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", *NODE_PORT_FLAGS)
# Ray gives a starting raylet 30 s to register with the GCS (ray/_private/node.py, fixed): on
# a loaded host a node can die starting, and is started once more.
STARTUP_ATTEMPTS = 2


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is `sid` (the `ray start` process and its tree)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces, so split after ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie has exited already
            out.append(int(entry.name))
    return out


def stop_session(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a node: SIGTERM every process of its session at once (its `ray start --block`,
    raylet, GCS, workers: stopping one by one takes ~40 s on a loaded host), then SIGKILL
    whatever is left after `timeout` seconds."""
    sid = proc.pid
    deadline = time.monotonic() + timeout
    while (left := session_pids(sid)) and time.monotonic() < deadline:
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        proc.poll()  # reap the `ray start` process, or it lingers as a zombie of the session
        time.sleep(0.5)
    for pid in session_pids(sid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < deadline:  # SIGKILL is not instant either
        time.sleep(0.2)


def stop_sessions(procs: list[subprocess.Popen]) -> None:
    """`stop_session` of every node at once (each waits for its own processes to go)."""
    threads = [threading.Thread(target=stop_session, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _start_node(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        # Its own session: its raylet, GCS, dashboard and workers are found and stopped by sid.
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _get(url: str, token: str) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as answer:
        return answer.read()


def _wait(
    what: str, ready, procs: list[subprocess.Popen], logs: list[Path], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        dead = [log for p, log in zip(procs, logs) if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            text = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
            raise RuntimeError(f"{what} did not come up:\n{text}")
        time.sleep(0.5)


def _alive_nodes(dashboard_url: str, token: str) -> int:
    # The state API: one entry per node, with its state.
    body = json.loads(_get(f"{dashboard_url}/api/v0/nodes?limit=100", token))
    nodes = body["data"]["result"]["result"]
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


@contextmanager
def ray_cluster(
    num_cpus: int = 4,
    resources: dict[str, float] | None = None,
    extra_nodes: Sequence[NodeSpec] = (),
    timeout: float = 120,
    system_env: dict[str, str] | None = None,
) -> Iterator[RayCluster]:
    """Start a token-authenticated head (plus `extra_nodes`) on 127.0.0.1; stop them on exit.

    Args:
        num_cpus: the head's logical CPUs.
        resources: the head's custom resources.
        extra_nodes: worker nodes joined to the head, each its own `ray start`.
        timeout: seconds to wait for the dashboard, job agent and nodes.
        system_env: more environment of every node and client, e.g. Ray's system config
            (`RAY_health_check_period_ms`: how soon the GCS declares a hung node dead).

    Yields:
        a RayCluster; its `env` is what clients (ray.init, `ray job`, `panet submit`) run with.
    """
    # A short root under /tmp: Ray's Unix sockets live in the temp dir (108-byte path limit).
    root = Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        with ExitStack() as stack:
            stack.callback(lambda: stop_sessions(procs))
            token, token_path = generate_token(root / "home")
            env = {**cluster_env(token_path), **(system_env or {})}
            ray_bin = str(VENV_BIN / "ray")
            head = root / "head"
            logs = [root / "head.log"]
            for attempt in range(STARTUP_ATTEMPTS):
                head_ports = _node_ports(HEAD_PORT_FLAGS)
                gcs_port = head_ports[0].split("=")[1]
                dash_port = head_ports[1].split("=")[1]
                address = f"127.0.0.1:{gcs_port}"
                dashboard_url = f"http://127.0.0.1:{dash_port}"
                head_cmd = [
                    ray_bin,
                    "start",
                    "--head",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1",
                    "--include-dashboard=true",
                    "--disable-usage-stats",
                    f"--temp-dir={head}",
                    *head_ports,
                    *_resources_flags(NodeSpec(num_cpus, dict(resources or {}))),
                ]
                procs.append(_start_node(head_cmd, env, logs[0]))
                try:
                    _wait(
                        "the Ray head's job server",
                        lambda url=dashboard_url: json.loads(_get(f"{url}/api/version", token)),
                        procs,
                        logs,
                        timeout,
                    )
                    break
                except RuntimeError:
                    if attempt + 1 == STARTUP_ATTEMPTS or procs[-1].poll() is None:
                        raise
                    stop_session(procs.pop())  # died starting: again, on new ports

            def start_node(i: int) -> None:
                spec = extra_nodes[i]
                restart = 1 + i < len(logs)
                # A restarted node gets a fresh temp dir: its session shares nothing with the
                # lost one's (short names: Ray's socket paths must stay under 108 bytes).
                temp = root / (
                    f"node{i}r{len(list(root.glob(f'node{i}*')))}" if restart else f"node{i}"
                )
                cmd = [
                    ray_bin,
                    "start",
                    "--block",
                    f"--address={address}",
                    "--node-ip-address=127.0.0.1",
                    "--disable-usage-stats",
                    f"--temp-dir={temp}",
                    *_node_ports(NODE_PORT_FLAGS),
                    *_resources_flags(spec),
                ]
                if restart:  # the new process replaces the lost one
                    procs[1 + i] = _start_node(cmd, env, logs[1 + i])
                    return
                logs.append(root / f"node{i}.log")
                procs.append(_start_node(cmd, env, logs[-1]))

            for i in range(len(extra_nodes)):
                start_node(i)
            for attempt in range(STARTUP_ATTEMPTS):
                try:
                    _wait(
                        f"{1 + len(extra_nodes)} Ray node(s)",
                        lambda: _alive_nodes(dashboard_url, token) == 1 + len(extra_nodes),
                        procs,
                        logs,
                        timeout,
                    )
                    break
                except RuntimeError:
                    dead = [i for i, p in enumerate(procs[1:]) if p.poll() is not None]
                    if attempt + 1 == STARTUP_ATTEMPTS or not dead or procs[0].poll() is not None:
                        raise
                    for i in dead:  # a node that died starting: once more, on new ports
                        stop_session(procs[1 + i])
                        start_node(i)
            yield RayCluster(
                address=address,
                dashboard_url=dashboard_url,
                env=env,
                token=token,
                temp_dir=head,
                pids=tuple(p.pid for p in procs),
                nodes=Nodes(procs, start_node),
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
