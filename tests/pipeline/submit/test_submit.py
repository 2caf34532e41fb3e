"""`panet submit`: argument handling, the runtime env, checks before submitting, and a tiny job
on a real token-authenticated local Ray cluster logging to a real MLflow server (logs streamed,
links, a config from outside the working dir, --stop, --logs, --list, what the uploaded working
dir holds)."""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.args import command_parser
from pipeline.submit import SubmitError
from pipeline.submit.check import JOBS, check_job
from pipeline.submit.cli import add_parser, cmd_submit, split_job
from pipeline.submit.client import connect, resolve_address
from pipeline.submit.runtime_env import pinned_requirements, runtime_env, staged_files
from tests.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[3]
CONFIG = "jobs/configs/tiny_synth.yaml"


def parse(*argv: str) -> argparse.Namespace:
    return split_job(command_parser(add_parser).parse_args(["submit", *argv]))


# ------------------------------------------------------------------------------------------
# Without a cluster


def test_options_before_and_after_the_job_and_job_args_after_dashes() -> None:
    args = parse("--address", "h:1", "eval", "--no-pip", "--", "--checkpoint", "c", "--data", "d")
    assert (args.job, args.address, args.no_pip) == ("eval", "h:1", True)
    assert args.job_args == ["--checkpoint", "c", "--data", "d"]
    args = parse("--set", "a=1", "train", "--config", "x.yaml", "--set", "b=2")
    assert (args.job, args.config, args.set, args.job_args) == (
        "train",
        "x.yaml",
        ["a=1", "b=2"],
        [],
    )
    assert parse("--list").list and parse("--list").job is None
    with pytest.raises(SubmitError, match="unknown job 'fit'"):
        parse("fit")
    with pytest.raises(SubmitError, match="unrecognized arguments: --bogus"):
        parse("train", "--bogus")
    with pytest.raises(SubmitError, match="unrecognized arguments: --image"):
        parse("train", "--image", "ghcr.io/x/panet:1")  # image_uri needs podman on every node


def test_address_from_argument_or_environment(monkeypatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SubmitError, match="no cluster"):
        resolve_address(None)
    assert resolve_address("10.0.0.1:8265/") == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://api:443")
    assert resolve_address(None) == "https://api:443"
    with pytest.raises(SubmitError, match="expected the dashboard"):
        resolve_address("ray://head:10001")


def test_no_cluster_named_is_said_before_any_check(monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # The config is bad too, but the missing address is what is reported: nothing was checked.
    args = command_parser(add_parser).parse_args(
        ["submit", "train", "--config", CONFIG, "--set", "name=a/b"]
    )
    assert cmd_submit(args) == 2
    out, err = capsys.readouterr()
    assert "no cluster: pass --address" in err and "`ray start --head`" in err
    assert "config key" not in err and out == ""


def test_an_unreachable_job_server_names_the_next_step() -> None:
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SubmitError) as err:
        connect(address)
    message = str(err.value)
    assert message.startswith(f"cannot reach the job server at {address}")
    assert "`ray start --head`" in message and "port-forward service/panet-head-svc" in message


def test_runtime_env_pins_constraints_or_installs_nothing() -> None:
    pins = {
        line.split("==")[0]: line
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    reqs = pinned_requirements()
    for name, pin in pins.items():
        if name != "ray":  # the cluster's own; a job never reinstalls it
            assert pin in reqs
    assert not any(r.startswith("ray") for r in reqs)
    assert any(r.startswith("pycocotools") for r in reqs)  # unpinned deps kept as declared
    env = runtime_env(parse("train"))
    assert env["working_dir"] == str(REPO) and env["pip"]["packages"] == reqs
    assert "pip" not in runtime_env(parse("train", "--no-pip"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pipeline.demo import ensure_shards

    root = tmp_path_factory.mktemp("submit-data")
    return {
        "train": ensure_shards(root / "raw", root / "shards", "train", 8, 0),
        "val": ensure_shards(root / "raw", root / "shards", "val", 4, 1),
    }


def tiny_sets(
    shards: dict[str, Path], storage: Path, name: str, steps: int = 2, tracking: str = ""
) -> list[str]:
    """A 2-step job on `shards`; MLflow at `tracking` (default: a SQLite file in `storage`)."""
    sets = {
        "name": name,
        "data.train": shards["train"],
        "data.val": shards["val"],
        "checkpoint.storage_path": storage,
        "tracking.uri": tracking or f"sqlite:///{storage / 'mlflow.db'}",
        "tracking.log_model": "false",
        "scaling.num_workers": 1,
        "solver.ims_per_batch": 2,
        "solver.max_steps": steps,
        "solver.warmup_steps": 0,
        "checkpoint.every_steps": steps,
        "eval.pictures": 0,
        "log_every": 1,
        "data.decode_concurrency": 1,
    }
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


SERVER = "http://mlflow.example:5000"  # never contacted by the checks


def test_checks_refuse_bad_jobs_before_any_cluster(shards, tmp_path) -> None:
    good = tiny_sets(shards, tmp_path, "ok", tracking=SERVER)
    job = check_job(parse("train", "--no-pip", "--config", str(REPO / CONFIG), *good))
    assert job.args[:2] == ["--config", CONFIG] and job.tracking_uri == SERVER
    assert job.staged == {}
    # A shipped config by name is the checkout's file, inside the working dir.
    assert check_job(parse("train", "--config", "tiny_synth", *good)).args[:2] == [
        "--config",
        CONFIG,
    ]
    with pytest.raises(SubmitError, match="config key 'solver.no_such_key'"):
        check_job(parse("train", "--config", CONFIG, *good, "--set", "solver.no_such_key=1"))
    with pytest.raises(SubmitError, match="config file 'nope.yaml' does not exist.*tiny_synth"):
        check_job(parse("train", "--config", "nope.yaml"))
    missing = [*good, "--set", f"data.val={tmp_path / 'nope'}"]
    with pytest.raises(SubmitError, match="data.val.*does not exist.*--no-data-check"):
        check_job(parse("train", "--config", CONFIG, *missing))
    check_job(parse("train", "--config", CONFIG, *missing, "--no-data-check"))
    with pytest.raises(SubmitError, match="not a valid eval job"):
        check_job(parse("eval", "--", "--data", "x"))  # --checkpoint is required
    with pytest.raises(SubmitError, match="--config/--set are for train and tune"):
        check_job(parse("eval", "--config", CONFIG))


def test_every_key_a_cluster_job_cannot_use_in_one_message(shards, tmp_path) -> None:
    """Relative paths (the demo's) and a tracking store in local files, all in one message,
    found before any cluster is contacted."""
    with pytest.raises(SubmitError) as err:
        check_job(parse("train", "--config", CONFIG))
    assert str(err.value).startswith(
        "config keys 'data.train' is 'demo/shards/train', 'data.val' is 'demo/shards/val', "
        "'checkpoint.storage_path' is 'demo/runs': a job needs an absolute path on shared storage"
    )
    assert "config key 'tracking.uri' is unset (a SQLite file under checkpoint.storage_path)" in (
        str(err.value)
    )
    assert "name an MLflow server every node reaches" in str(err.value)
    # Shared paths, but each kind of local store is refused: a two-node job could not open it.
    for store in (f"sqlite:///{tmp_path / 'mlflow.db'}", f"file://{tmp_path}/mlruns", "mlruns"):
        sets = tiny_sets(shards, tmp_path, "local", tracking=store)
        with pytest.raises(SubmitError, match="^config key 'tracking.uri' is '[^']+': MLflow"):
            check_job(parse("train", "--config", CONFIG, *sets))
    # A dry run writes nothing: its store does not matter.
    dry = tiny_sets(shards, tmp_path, "dry")
    check_job(parse("train", "--config", CONFIG, *dry, "--", "--dry-run"))


def test_a_config_outside_the_working_dir_is_uploaded_with_the_job(shards, tmp_path) -> None:
    outside = tmp_path / "job.yaml"
    shutil.copy(REPO / CONFIG, outside)
    job = check_job(
        parse("train", "--config", str(outside), *tiny_sets(shards, tmp_path, "o", tracking=SERVER))
    )
    (rel,) = job.staged
    assert re.fullmatch(r"\.panet-submit/job-[0-9a-f]{12}\.yaml", rel)
    assert job.staged[rel] == outside and job.args[:2] == ["--config", rel]
    wd = tmp_path / "wd"
    wd.mkdir()
    with staged_files(wd, job.staged):
        assert (wd / rel).read_text() == outside.read_text()
    assert list(wd.iterdir()) == []  # the copy and its folder are gone once uploaded


def test_a_sweep_is_checked_like_tunes_dry_run(capsys) -> None:
    job = check_job(parse("tune", "--set", "solver.max_steps=10", "--", "--sweep", "table4"))
    assert job.args == ["--set", "solver.max_steps=10", "--sweep", "table4"]
    assert job.tracking_uri == "http://mlflow.mlflow.svc:5000"  # coco_panet_r50's, by name
    assert "sweep 'table4': 5 trial(s)" in capsys.readouterr().out
    # The same note as the dry run when the sweep trains at other sizes than its base config.
    check_job(parse("tune", "--", "--sweep", "table3", "--config", "tiny_synth", "--dry-run"))
    assert "data.max_size: 400 in the base config -> 1333 or 1400" in capsys.readouterr().out
    with pytest.raises(SubmitError, match="sweep file 'no-such-sweep' does not exist"):
        check_job(parse("tune", "--", "--sweep", "no-such-sweep"))
    with pytest.raises(SubmitError, match="config keys 'data.train' is 'demo/shards/train'"):
        check_job(parse("tune", "--", "--sweep", "demo"))  # tiny_synth: the demo's paths


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_entrypoint_runs_its_panet_sub_command(job, monkeypatch) -> None:
    """`python -m jobs.<job> ARGS` is `panet <sub-command> ARGS`, in the same process, parsed by
    the parser of that sub-command alone (the one `panet submit` checks the job with)."""
    import jobs.entry

    seen: list[tuple[list[str], list[str]]] = []

    def record(parser: argparse.ArgumentParser, argv: list[str]) -> int:
        seen.append((sorted(parser._subparsers._group_actions[0].choices), argv))
        return 7

    monkeypatch.setattr(jobs.entry, "run_command", record)
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--config", "x.yaml", "--set", "a=1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"jobs.{job}", run_name="__main__")
    assert exit_.value.code == 7
    words = JOBS[job].words
    assert seen == [([words[0]], [*words, "--config", "x.yaml", "--set", "a=1"])]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_entrypoint_reaches_the_real_sub_command(job, monkeypatch, capsys) -> None:
    """The entrypoint's help is its sub-command's, which is also the parser submit checks with."""
    checked = command_parser(JOBS[job].add_parser)._subparsers._group_actions[0].choices
    assert sorted(checked) == [JOBS[job].words[0]]
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"jobs.{job}", run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: panet {' '.join(JOBS[job].words)}")


def test_train_entrypoint_checks_a_config_like_panet_train(shards, tmp_path) -> None:
    sets = tiny_sets(shards, tmp_path, "entry")
    out = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", CONFIG, *sets, "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "config and data OK: 8 training images" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", CONFIG, "--set", "solver.max_steps=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "panet train: error: config key 'solver.max_steps'" in bad.stderr


# ------------------------------------------------------------------------------------------
# On a real cluster


@pytest.fixture(scope="module")
def cluster(token_cluster):
    return token_cluster  # the session's cluster (tests/conftest.py)


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's files, plus what must never be uploaded: a .venv, data, runs."""
    wd = tmp_path_factory.mktemp("wd")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (wd / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, wd / name)
    # .gitignore covers some of them; shards/ and weights/*.pth only .rayignore does.
    for junk in (
        ".venv/lib/big.so",
        "data/coco/train.bin",
        "runs/job/state.pt",
        "shards/coco/part-00000.parquet",
        "weights/resnet50.pth",
    ):
        (wd / junk).parent.mkdir(parents=True, exist_ok=True)
        (wd / junk).write_bytes(os.urandom(3 << 20))
    return wd


def panet(cluster, *argv: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["panet", "submit", "--address", cluster.dashboard_url, *argv],
        cwd=cwd,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_ids(cluster, cwd: Path) -> list[str]:
    out = panet(cluster, "--list", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith("raysubmit_")]


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_job_runs_streams_and_links(
    cluster, shards, working_dir, mlflow_uri, tmp_path
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    storage = tmp_path / "runs"
    outside = tmp_path / "my-job.yaml"  # a user's config, not in the working dir: uploaded too
    shutil.copy(REPO / CONFIG, outside)
    cmd = ["panet", "submit", "--address", cluster.dashboard_url, "train", "--no-pip"]
    cmd += ["--working-dir", str(working_dir), "--config", str(outside)]
    cmd += tiny_sets(shards, storage, "submit-tiny", tracking=mlflow_uri)
    proc = subprocess.Popen(
        cmd, cwd=working_dir, env=cluster.env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=900) == 0, "\n".join(text for _, text in lines)
    reader.join()
    text = "\n".join(t for _, t in lines)

    job_id = re.search(r"\[submit\] job id: (raysubmit_\w+)", text).group(1)
    assert f"[submit] dashboard: {cluster.dashboard_url}/#/jobs/{job_id}" in text
    assert f"[submit] job {job_id}: SUCCEEDED" in text
    # The job's own output arrived while it ran, well before the end of the stream.
    started = next(t for t, line in lines if line.startswith("[panet] job 'submit-tiny'"))
    ended = next(t for t, line in lines if line.endswith(": SUCCEEDED"))
    assert ended - started > 3 and "COCO metrics of the last evaluation" in text
    # The MLflow link names the job's run, which finished on the server.
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", text).group(1)
    uri = mlflow_uri
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    link = f"[submit] MLflow run: {tracking.run_page_url(uri, run_id)}"
    assert link in text and f"/#/experiments/{run.info.experiment_id}/runs/{run_id}" in link
    assert (storage / "submit-tiny" / "step-00000002" / "state.pt").is_file()

    # What was uploaded: the code, none of the data, runs or .venv.
    unpacked = cluster.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    packages = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
    assert packages, sorted(p.name for p in unpacked.iterdir())
    staged = re.search(r"entrypoint: python -m jobs.train --config (\S+)", text).group(1)
    assert staged.startswith(".panet-submit/my-job-")
    assert not (working_dir / ".panet-submit").exists()  # removed once uploaded
    for package in packages:
        assert (package / "pipeline" / "submit" / "cli.py").is_file()
        assert (package / "jobs" / "train.py").is_file() and (package / CONFIG).is_file()
        assert (package / staged).read_text() == outside.read_text()
        for left_out in (".venv", "data", "runs", ".git", "shards", "weights"):
            assert not (package / left_out).exists(), left_out
        size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
        assert size < 3 << 20, f"uploaded {size / 2**20:.1f} MiB"  # the junk: 15 MiB

    # --logs replays a finished job; --list shows it.
    logs = panet(cluster, "--logs", job_id, cwd=working_dir)
    assert logs.returncode == 0 and "[panet] job 'submit-tiny'" in logs.stdout
    assert f"[submit] job {job_id}: SUCCEEDED" in logs.stdout
    assert job_id in job_ids(cluster, working_dir)


@pytest.mark.ray
def test_stop_a_running_job(cluster, shards, working_dir, mlflow_uri, tmp_path) -> None:
    args = ["train", "--no-pip", "--no-wait", "--working-dir", str(working_dir)]
    sets = tiny_sets(shards, tmp_path, "stop", 10**6, tracking=mlflow_uri)
    args += ["--config", str(working_dir / CONFIG), *sets]
    out = panet(cluster, *args, cwd=working_dir)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"job id: (raysubmit_\w+)", out.stdout).group(1)
    assert f"panet submit --logs {job_id}" in out.stdout
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + 300
    while (status := job_status(cluster, job_id)) != JobStatus.RUNNING.value:
        assert status == "PENDING" and time.monotonic() < deadline, status
        time.sleep(1)
    stopped = panet(cluster, "--stop", job_id, cwd=working_dir)
    assert stopped.returncode == 0, stopped.stderr
    assert f"[submit] job {job_id}: STOPPED" in stopped.stdout
    assert job_status(cluster, job_id) == "STOPPED"


def job_status(cluster, job_id: str) -> str:
    """The job's status from the job server's REST API, with the cluster's token."""
    req = urllib.request.Request(
        f"{cluster.dashboard_url}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    with urllib.request.urlopen(req, timeout=30) as answer:
        return json.loads(answer.read())["status"]


@pytest.mark.ray
def test_bad_config_or_no_token_submits_nothing(cluster, shards, working_dir, tmp_path) -> None:
    before = job_ids(cluster, working_dir)
    bad = panet(
        cluster,
        "train",
        "--no-pip",
        "--working-dir",
        str(working_dir),
        "--config",
        str(working_dir / CONFIG),
        *tiny_sets(shards, tmp_path, "bad", tracking=SERVER),
        "--set",
        "solver.max_steps=0",
        cwd=working_dir,
    )
    assert bad.returncode == 2 and "job id" not in bad.stdout
    assert "panet submit: error: config key 'solver.max_steps'" in bad.stderr
    assert job_ids(cluster, working_dir) == before
    # Token auth is on: without the token the job server answers no request.
    env = {**cluster.env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token"), "HOME": str(tmp_path)}
    out = subprocess.run(
        ["panet", "submit", "--address", cluster.dashboard_url, "--list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "panet submit: error: cannot reach the job server" in out.stderr
    assert "export RAY_AUTH_MODE=token" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
