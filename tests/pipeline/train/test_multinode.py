"""Several nodes: elastic gradient accumulation, and a real two-node Ray cluster.

The cluster tests use the session's two Ray nodes on this machine (two raylets, each its own
temp dir, logical CPUs and one unit of a custom resource, token authentication on), its
S3-compatible server and its `mlflow server` (tests/conftest.py), and submit the tiny training
job with the `ray job submit` client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from pipeline.train.elastic import group_steps, micro_batches
from pipeline.train.step import train_step
from tests.conftest import SLOT

REPO = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------------------------------
# Gradient accumulation keeps the global batch


class ToyDetector(nn.Module):
    """torchvision's calling convention on a linear model: the loss is a mean over images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 1)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        x = torch.stack(images)  # (B, 4)
        y = torch.stack([t["y"] for t in targets])  # (B, 1)
        return {"loss_a": ((self.fc(x) - y) ** 2).mean(), "loss_b": self.fc(x).abs().mean()}


class _Job:
    class solver:  # noqa: N801 - mirrors JobConfig.solver
        amp = "off"
        clip_grad_norm = 0.0


def _constant(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _micro_batches(n: int, size: int = 2) -> list[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        images = [torch.randn(4, generator=g) for _ in range(size)]
        targets = [{"y": torch.randn(1, generator=g)} for _ in range(size)]
        out.append((images, targets))
    return out


def _full_world_step(max_workers: int) -> Tensor:
    """Reference: one SGD step on the mean gradient of `max_workers` micro-batches."""
    model = ToyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for images, targets in _micro_batches(max_workers):
        loss = sum(model(images, targets).values()) / max_workers
        loss.backward()
    opt.step()
    return model.fc.weight.detach().clone()


def test_micro_batch_shares_cover_the_full_world_once() -> None:
    for max_workers in range(1, 6):
        for size in range(1, max_workers + 1):
            shares = [micro_batches(max_workers, size, r) for r in range(size)]
            assert sum(s.count for s in shares) == max_workers
            assert {s.passes for s in shares} == {max(s.count for s in shares)}
            assert all(s.weight == size / max_workers for s in shares)
    assert micro_batches(2, 2, 1).passes == 1 and micro_batches(2, 1, 0).count == 2
    with pytest.raises(ValueError, match="world_size"):
        micro_batches(2, 3, 0)
    assert list(group_steps(range(5), 2)) == [[0, 1], [2, 3], [4]]


def test_one_worker_accumulates_the_missing_ranks_share() -> None:
    model = ToyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    share = micro_batches(max_workers=3, world_size=1, rank=0)
    micro = _micro_batches(3)
    result = train_step(model, micro, opt, _constant(opt), scaler, _Job, torch.device("cpu"), share)
    assert result.bad is None and set(result.losses) == {"loss_a", "loss_b"}
    torch.testing.assert_close(model.fc.weight, _full_world_step(3))


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(ToyDetector())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        share = micro_batches(max_workers=3, world_size=2, rank=rank)  # 2 + 1 micro-batches
        micro = [b for i, b in enumerate(_micro_batches(3)) if i % 2 == rank]
        train_step(model, micro, opt, _constant(opt), scaler, _Job, torch.device("cpu"), share)
        torch.save(model.module.fc.weight.detach().clone(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_of_three_workers_keep_the_global_batch(tmp_path: Path) -> None:
    """2 DDP ranks over gloo doing 3 workers' micro-batches (an uneven share) = the full world."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    reference = _full_world_step(3)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), reference)


def test_driver_goes_on_when_its_working_directory_is_deleted(tmp_path: Path) -> None:
    """What a second raylet sharing the head's temp dir does to a `ray job submit` driver."""
    script = f"""
import os, shutil
from pipeline.ray_session import keep_working_directory
from pipeline import tracking
os.chdir({str(tmp_path / "cwd")!r}); shutil.rmtree({str(tmp_path / "cwd")!r})
keep_working_directory()
print(tracking.start_or_resume_run("sqlite:///{tmp_path}/mlflow.db", "e", "job", None, {{}}))
"""
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "working directory was deleted" in out.stdout


# ---------------------------------------------------------------------------------------------
# The resource check on an autoscaling cluster


def _gpu_job(**sets: Any) -> Any:
    from pipeline.config import load_job_config

    base = {"data.train": "s3://b/train", "data.val": "s3://b/val", "scaling.use_gpu": True}
    return load_job_config(REPO / CONFIG_REL, {**base, **sets})


def test_autoscaling_cluster_without_gpus_yet_is_a_warning() -> None:
    from pipeline.train.preflight import check_resources

    job = _gpu_job()
    now = {"CPU": 4.0}  # the head only; the GPU group has min replicas 0
    with pytest.raises(ValueError, match="scaling.use_gpu"):
        check_resources(job, now, autoscaler_max={})  # a fixed cluster: refused
    with pytest.warns(UserWarning, match="autoscaler adds nodes"):
        check_resources(job, now, autoscaler_max={"CPU": 36.0, "GPU": 4.0})
    with pytest.raises(ValueError, match="grows to at most 1"):
        check_resources(job, now, autoscaler_max={"CPU": 36.0, "GPU": 1.0})
    check_resources(_gpu_job(**{"ray.check_resources": False}), now, autoscaler_max={})


def test_skip_resource_check_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main as panet
    from pipeline.demo import ensure_shards

    raw, out = tmp_path / "raw", tmp_path / "shards"
    shards = {
        "train": ensure_shards(raw, out, "train", 16, 0),
        "val": ensure_shards(raw, out, "val", 2, 1),
    }
    workers = (os.cpu_count() or 1) * 4  # more than this machine can hold
    args = ["train", "--config", str(REPO / CONFIG_REL), "--dry-run"]
    args += ["--set", f"data.train={shards['train']}", "--set", f"data.val={shards['val']}"]
    args += ["--set", f"scaling.num_workers={workers}", "--set", f"solver.ims_per_batch={workers}"]
    capsys.readouterr()
    assert panet(args) == 2
    assert "config key 'scaling.num_workers'" in capsys.readouterr().err
    assert panet([*args, "--skip-resource-check"]) == 0


# ---------------------------------------------------------------------------------------------
# A real two-node cluster: `ray job submit`, S3 storage, an MLflow server

# After a node dies, Ray Train may first restart on a stale view of the cluster that still
# holds it (Ray Data's autoscaling coordinator refreshes every 20 s) and wait for the worker
# that cannot start, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default, 30 s here).
START_TIMEOUT_S = 30
HANG_BOUND_S = 150  # health checks (~15 s) + one start timeout + two restarts, on a loaded host


@dataclass
class Stack:
    cluster: Any
    s3_env: dict[str, str]
    mlflow: str
    shards: dict[str, str]


@pytest.fixture(scope="module")
def stack(
    token_cluster: Any, s3_env: dict[str, str], mlflow_uri: str, tmp_path_factory
) -> Iterator[Stack]:
    """The session's two Ray nodes, S3 server (holding this module's shards) and MLflow server
    (tests/conftest.py); the S3 variables set in this process for the module."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_env.items():
            env.setenv(key, value)
        shards = _shards_on_s3(tmp_path_factory.mktemp("multinode"))
        yield Stack(token_cluster, s3_env, mlflow_uri, shards)


@pytest.fixture
def whole_cluster(stack: Stack) -> Iterator[Stack]:
    """The stack, with every node a test stopped started again when it ends, pass or fail."""
    wait_for_nodes(stack, 2)
    yield stack
    stack.cluster.nodes.restore()


def _shards_on_s3(root: Path) -> dict[str, str]:
    from pipeline.cli import main as panet
    from pipeline.data.synth import write_synthetic

    out = {}
    for split, images, seed in (("train", 16, 0), ("val", 4, 1)):
        write_synthetic("coco", images, seed, root / "raw" / split, split=split)
        raw = root / "raw" / split
        out[split] = f"s3://panet/data/{split}"
        args = ["data", "convert", "coco", "--out", out[split], "--workers", "1", "--quiet"]
        args += ["--annotations", str(raw / "annotations" / f"instances_{split}.json")]
        args += ["--images", str(raw / "images" / split)]
        assert panet(args) == 0
    return out


def _ray(stack: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "ray"), *args],
        env=stack.cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(
    stack: Stack, name: str, wait: bool, env: dict[str, str] | None = None, **sets: Any
) -> subprocess.CompletedProcess:
    """`ray job submit` of the tiny job, data and checkpoints on S3, MLflow on the server;
    `env`: more environment of the job (driver, Train controller, workers)."""
    config = {
        "name": name,
        "data.train": stack.shards["train"],
        "data.val": stack.shards["val"],
        "data.train_scales": [128, 160],
        "data.max_size": 200,
        "data.decode_concurrency": 1,
        "solver.warmup_steps": 1,
        "eval.every_steps": 0,
        "eval.pictures": 0,
        "eval.batch_size": 2,
        "log_every": 1,
        "checkpoint.storage_path": "s3://panet/runs",
        "scaling.worker_resource": SLOT,
        "tracking.log_model": False,
        "ray.max_failures": 3,
        **sets,
    }
    runtime_env = {"env_vars": {**stack.s3_env, "MLFLOW_TRACKING_URI": stack.mlflow, **(env or {})}}
    args = ["job", "submit", "--address", stack.cluster.dashboard_url, "--working-dir", str(REPO)]
    args += ["--submission-id", name, "--runtime-env-json", json.dumps(runtime_env)]
    args += [] if wait else ["--no-wait"]
    args += ["--", "python", "-m", "pipeline.cli", "train", "--config", str(CONFIG_REL)]
    for key, value in config.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return _ray(stack, *args)


CONFIG_REL = Path("jobs") / "configs" / "tiny_synth.yaml"


def job_status(stack: Stack, name: str) -> str:
    done = _ray(stack, "job", "status", "--address", stack.cluster.dashboard_url, name)
    out = done.stdout + done.stderr  # Ray's CLI logger writes to either
    words = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
    for word, status in words.items():
        if f"Job '{name}' {word}" in out:
            return status
    for status in ("RUNNING", "PENDING"):
        if f"Status for job '{name}': {status}" in out:
            return status
    return "UNKNOWN"


def wait_for(what: str, ready: Callable[[], Any], timeout: float, stack: Stack, name: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if job_status(stack, name) in ("FAILED", "STOPPED", "SUCCEEDED"):
            break
        time.sleep(2)
    logs = _ray(stack, "job", "logs", "--address", stack.cluster.dashboard_url, name).stdout
    raise AssertionError(f"{what}: not seen\n{logs[-6000:]}")


def job_logs(stack: Stack, name: str) -> str:
    return _ray(stack, "job", "logs", "--address", stack.cluster.dashboard_url, name).stdout


def finish(stack: Stack, name: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (status := job_status(stack, name)) in ("RUNNING", "PENDING", "UNKNOWN"):
        assert time.monotonic() < deadline, f"job {name} still {status}\n{job_logs(stack, name)}"
        time.sleep(3)
    return status


def mlflow_run(stack: Stack, name: str) -> Any:
    """The job's one MLflow run (asserting there is exactly one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.mlflow)
    experiment = client.get_experiment_by_name("panet-demo")
    runs = client.search_runs([experiment.experiment_id], f"tags.job = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def checkpoints(name: str, whole: bool = True) -> list[str]:
    """The job's checkpoint directories on S3.

    Args:
        whole: assert that each holds its state and metrics (once the job has ended: none is
            left half-written); False: only those that do (one may be uploading now).
    """
    from pipeline import storage

    steps = [n for n in storage.list_names(f"s3://panet/runs/{name}") if n.startswith("step-")]
    done = []
    for step in steps:
        files = set(storage.list_names(f"s3://panet/runs/{name}/{step}"))
        assert not whole or {"state.pt", "metrics.json"} <= files, (step, files)
        if {"state.pt", "metrics.json"} <= files:
            done.append(step)
    return done


def cluster_node_ids(stack: Stack, alive: bool = False) -> set[str]:
    from tests.ray_cluster import _get

    url = f"{stack.cluster.dashboard_url}/api/v0/nodes?limit=100"
    nodes = json.loads(_get(url, stack.cluster.token))["data"]["result"]["result"]
    return {n["node_id"] for n in nodes if not alive or n.get("state") == "ALIVE"}


def alive_nodes(stack: Stack) -> int:
    from tests.ray_cluster import _alive_nodes

    return _alive_nodes(stack.cluster.dashboard_url, stack.cluster.token)


@pytest.mark.ray
@pytest.mark.slow
def test_a_lost_node_back_resumes_in_place_and_one_gone_for_good_stops_the_job(
    whole_cluster: Stack,
) -> None:
    """A fixed-size job loses a node that comes back: it resumes from its last checkpoint in the
    same job. It loses it again for good: after `ray.capacity_wait_s` it stops, naming the node,
    its run FAILED and its checkpoints whole."""
    stack, name = whole_cluster, "node-loss"
    # Start tries of 10 s, 30 s in all over the job (`pipeline/train/capacity.py`): the first
    # loss may use a try while the node restarts (back ~10 s after it went); the second loss
    # uses up the rest and ends the job.
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    sets = {"solver.max_steps": 40, "checkpoint.every_steps": 3, "ray.capacity_wait_s": 30}
    # Long enough that the node is lost twice mid-job on a fast host too (checkpoints every 3
    # steps; the node goes down as soon as one is seen); the job never reaches the end.
    assert submit(stack, name, wait=False, env=env, **sets).returncode == 0
    wait_for("a first checkpoint", lambda: checkpoints(name, whole=False), 300, stack, name)
    stack.cluster.nodes.stop(0)
    time.sleep(5)  # the job sees the lost node and waits for room
    stack.cluster.nodes.start(0)
    wait_for(
        "training resumed in the same job",
        lambda: "resumed from the checkpoint at step" in job_logs(stack, name),
        300,
        stack,
        name,
    )
    resumed = len(checkpoints(name, whole=False))
    wait_for(
        "a checkpoint after the resume",
        lambda: len(checkpoints(name, whole=False)) > resumed,
        300,
        stack,
        name,
    )
    lost = cluster_node_ids(stack, alive=True)
    stack.cluster.nodes.stop(0)
    wait_for_nodes(stack, 1)
    lost -= cluster_node_ids(stack, alive=True)
    assert finish(stack, name, timeout=300) == "FAILED"
    logs = job_logs(stack, name)
    assert "panet train: job 'node-loss' stopped: no room on the cluster for its 2 workers" in logs
    said = logs.split("nodes lost since the job started: ")[-1]
    assert "ray.capacity_wait_s" in logs and f"{lost.pop()} at " in said, logs[-3000:]
    assert mlflow_run(stack, name).info.status == "FAILED"
    assert checkpoints(name)  # every one whole: a re-run resumes from the newest (test_resume)


@pytest.mark.ray
@pytest.mark.slow
def test_elastic_job_goes_on_when_a_node_hangs_and_grows_back(whole_cluster: Stack) -> None:
    """A node whose raylet hangs (SIGSTOP: alive, sockets open, answering nothing) instead of
    dying: the job trains on without it within HANG_BOUND_S; resumed, the node leaves; started
    again, the job grows back to 2 workers. (A node that dies outright: the node-loss test.)"""
    from pipeline import storage
    from pipeline.state_file import whole_checkpoints

    stack, name = whole_cluster, "elastic"
    sets = {
        "solver.max_steps": 40,
        "checkpoint.every_steps": 3,
        "scaling.num_workers": [1, 2],
        "scaling.resize_interval_s": 5.0,
    }
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S)}
    assert submit(stack, name, wait=False, env=env, **sets).returncode == 0
    deadline = time.monotonic() + 300
    while not checkpoints(name, whole=False):  # no `ray job status` between: it takes seconds
        assert time.monotonic() < deadline, job_logs(stack, name)[-6000:]
        time.sleep(0.5)
    kept = int(checkpoints(name, whole=False)[-1].removeprefix("step-"))
    hung = time.monotonic()
    stack.cluster.nodes.pause(0, only="raylet")  # its workers run on, cut off from Ray

    def resizes() -> list[dict]:
        tags = mlflow_run(stack, name).data.tags
        return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("resize.")]

    down = wait_for("a resize to 1 worker", resizes, HANG_BOUND_S, stack, name)[0]
    took = time.monotonic() - hung
    print(f"\nhung raylet -> training on 1 worker after {took:.1f} s")
    assert (down["old"], down["new"]) == (2, 1) and took < HANG_BOUND_S
    # The newest checkpoint on storage may still be on its way to Ray Train's controller when
    # the node goes (uploaded, not yet registered): the job resumes from it or the one before.
    assert down["step"] >= kept - sets["checkpoint.every_steps"]
    stack.cluster.nodes.resume(0)
    # Resumed, the raylet hears from the GCS that its node is dead and exits with its workers.
    deadline = time.monotonic() + 60
    while not stack.cluster.nodes.exited(0):
        assert time.monotonic() < deadline, "the resumed node's processes did not exit"
        time.sleep(1)
    print(f"resumed node gone {time.monotonic() - hung:.1f} s after its raylet hung")
    stack.cluster.nodes.stop(0)  # reaped
    stack.cluster.nodes.start(0)
    wait_for("a resize back to 2 workers", lambda: len(resizes()) > 1, 300, stack, name)
    assert finish(stack, name) == "SUCCEEDED", job_logs(stack, name)[-6000:]
    up = resizes()[1]
    assert (up["old"], up["new"]) == (1, 2) and up["step"] > down["step"]
    run = mlflow_run(stack, name)
    assert run.info.status == "FINISHED" and run.data.metrics["world_size"] == 2
    nodes = json.loads(run.data.tags["worker_nodes"])  # one rank on each node at the end
    assert len(set(nodes)) == 2 and set(nodes) <= cluster_node_ids(stack)
    # Every sealed checkpoint is whole and the last is step 40. A resize stops the workers
    # without waiting for an upload: a directory cut that way has no seal and is left out.
    whole = [p.name for p in whole_checkpoints(f"s3://panet/runs/{name}")]
    assert whole[-1] == "step-00000040", whole
    assert storage.is_file(f"s3://panet/runs/{name}/step-00000040/state.pt")


def wait_for_nodes(stack: Stack, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while alive_nodes(stack) != n:
        assert time.monotonic() < deadline, f"{n} nodes not alive"
        time.sleep(1)


@pytest.mark.ray
def test_storage_check_runs_on_every_node(stack: Stack) -> None:
    """A Ray client of the cluster (its own process: token auth is read at start)."""
    script = f"""
import ray
from pipeline import storage
ray.init(address={stack.cluster.address!r}, runtime_env={{"env_vars": {stack.s3_env!r}}})
storage.check_on_every_node(
    {{"data.train": {stack.shards["train"]!r}}}, {{"checkpoint.storage_path": "s3://panet/runs"}}
)
try:
    storage.check_on_every_node({{"data.val": "s3://panet/no/such/shards"}}, {{}})
except ValueError as err:
    print("MESSAGE", err)
"""
    wait_for_nodes(stack, 2)
    env = {**stack.cluster.env, **stack.s3_env, "PYTHONPATH": str(REPO)}
    python = str(REPO / ".venv" / "bin" / "python")
    out = subprocess.run(
        [python, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    message = out.stdout.split("MESSAGE", 1)[1]
    assert message.count("config key 'data.val'") == 2  # one line per node
    assert all(node[:12] in message for node in cluster_node_ids(stack, alive=True))
    from pipeline import storage

    assert not [n for n in storage.list_names("s3://panet/runs") if "probe" in n]
