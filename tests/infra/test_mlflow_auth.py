"""The MLflow server as the images deploy it, and a training job that logs to it as a user
without admin rights.

The server runs in a fresh virtual environment built from the MLflow image's lock file
(infra/docker/requirements-mlflow.txt), with compose.yaml's own command: basic authentication,
the tracking store and the user store in PostgreSQL (16, from the `pgserver` wheel; databases
made as the postgres image and init-auth-db.sql make them), artifacts proxied to S3 (moto). The
admin creates the training user with the REST calls of infra/README.md; `panet train` runs
with that user's login and nothing else, and its run, metrics and artifacts are read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests
import yaml

from pipeline.demo import ensure_shards
from tests.mlflow_server import free_port, stop_group
from tests.s3_server import s3_server

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "infra" / "docker"
MLFLOW_LOCK = DOCKER / "requirements-mlflow.txt"
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"
# PostgreSQL 16 server binaries in a wheel; the deployment runs postgres:16.
PGSERVER = "pgserver==0.1.4"
ADMIN_PASSWORD = "admin-" + "a1" * 12  # MLflow refuses admin passwords under 12 characters
TRAINER, TRAINER_PASSWORD = "panet-trainer", "trainer-" + "b2" * 12
DB_PASSWORD = "db-" + "c3" * 12


def cached(name: str, key: str, build) -> Path:
    """A directory under the temp dir built once per `key` by `build(path)`; a build that did
    not finish (no marker) is thrown away. Virtual environments keep their absolute path."""
    path = Path(tempfile.gettempdir()) / f"panet-test-{name}-{key}"
    marker = path / ".complete"
    if not marker.exists():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        build(path)
        marker.touch()
    return path


def image_venv() -> Path:
    """A venv with exactly the MLflow image's packages (its lock file), keyed by the file."""
    key = hashlib.sha256(MLFLOW_LOCK.read_bytes()).hexdigest()[:16]

    def build(path: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        done = subprocess.run(
            [*pip, "-r", str(MLFLOW_LOCK)], capture_output=True, text=True, timeout=1200
        )
        assert done.returncode == 0, f"pip install -r {MLFLOW_LOCK.name}:\n{done.stderr[-3000:]}"

    return cached("mlflow-image", key, build)


def postgres_bin() -> Path:
    def build(path: Path) -> None:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        cmd = [*pip, "--target", str(path), PGSERVER]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"pip install {PGSERVER}:\n{done.stderr[-3000:]}"

    key = PGSERVER.replace("==", "-")
    return cached("pgserver", key, build) / "pgserver" / "pginstall" / "bin"


@contextlib.contextmanager
def postgres(log_dir: Path) -> Iterator[int]:
    """PostgreSQL on a free localhost port with password login for user `mlflow`, holding the
    databases the deployment's postgres makes: `mlflow` (POSTGRES_DB) and, from
    init-auth-db.sql, `mlflow_auth`. Yields the port."""
    bin_dir = postgres_bin()
    # PostgreSQL refuses to run as root: as root (CI), the server runs as `nobody`.
    user = "nobody" if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="panet-test-pg-"))
    try:
        (home / "pw").write_text(DB_PASSWORD + "\n")
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (home, home / "pw"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        data = home / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--no-sync"]
        initdb += [f"--pwfile={home / 'pw'}", "--auth=scram-sha-256", "--encoding=UTF8"]
        subprocess.run(initdb, check=True, capture_output=True, user=user, timeout=120)
        port = free_port()
        log_path = log_dir / "postgres.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed after the server
        server = subprocess.Popen(  # no Unix socket; no fsync: the data dies with the test
            [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port)]
            + ["-k", "", "-c", "fsync=off"],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=user,
            start_new_session=True,
        )
        try:
            env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
            login = ["-h", "127.0.0.1", "-p", str(port), "-U", "mlflow"]
            deadline = time.monotonic() + 60
            ready = [str(bin_dir / "pg_isready"), "--quiet", *login]
            while subprocess.run(ready).returncode != 0:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"postgres did not start:\n{log_path.read_text()}")
                time.sleep(0.3)
            subprocess.run([str(bin_dir / "createdb"), *login, "mlflow"], env=env, check=True)
            psql = [str(bin_dir / "psql"), *login, "-d", "mlflow", "-q", "-v", "ON_ERROR_STOP=1"]
            subprocess.run([*psql, "-f", str(DOCKER / "init-auth-db.sql")], env=env, check=True)
            yield port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            server.wait(timeout=60)
            log.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def substitute(value: str, variables: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:?message} and ${NAME:-default} in `value`."""

    def one(match: re.Match) -> str:
        name, op, arg = match[1], match[2], match[3]
        if name in variables:
            return variables[name]
        assert op == ":-", f"compose.yaml needs {name}, which the test does not set"
        return arg

    return re.sub(r"\$\{(\w+)(?:(:[?-])([^}]*))?\}", one, value)


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"compose.yaml's mlflow service no longer has {old!r}"
    return text.replace(old, new)


@contextlib.contextmanager
def compose_mlflow(root: Path, pg_port: int, s3_env: dict[str, str]) -> Iterator[str]:
    """compose.yaml's mlflow service, run here: its entrypoint, command and environment, with
    the other services' host names and the listening address replaced by this machine's.
    Yields the server's URI."""
    service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["mlflow"]
    port = free_port()
    auth_ini = root / "basic_auth.ini"
    dotenv = {  # what infra/docker/.env holds
        "POSTGRES_PASSWORD": DB_PASSWORD,
        "MLFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_SECRET_KEY": "secret-key-" + "d4" * 12,
        "AWS_ACCESS_KEY_ID": s3_env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3_env["AWS_SECRET_ACCESS_KEY"],
    }
    env = {name: substitute(str(value), dotenv) for name, value in service["environment"].items()}
    env["MLFLOW_AUTH_CONFIG_PATH"] = replace_once(
        env["MLFLOW_AUTH_CONFIG_PATH"], "/tmp/basic_auth.ini", str(auth_ini)
    )
    env["MLFLOW_S3_ENDPOINT_URL"] = s3_env["AWS_ENDPOINT_URL"]  # compose: http://minio:9000
    env["MLFLOW_SERVER_ALLOWED_HOSTS"] = f"127.0.0.1:{port}"
    env["AWS_DEFAULT_REGION"] = s3_env["AWS_DEFAULT_REGION"]
    venv = image_venv()
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", HOME=str(root))
    (command,) = service["command"]
    command = command.replace("$$", "$")  # compose's escape for the container's shell
    command = replace_once(command, "/tmp/basic_auth.ini", str(auth_ini))
    for host in ('@postgres:5432/mlflow"', "@postgres:5432/mlflow_auth"):
        command = replace_once(command, host, host.replace("postgres:5432", f"127.0.0.1:{pg_port}"))
    command = replace_once(command, "--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")
    # Two workers, not four, on a 2-core machine: still processes that share the secret key,
    # the user store and each its own login cache.
    command = replace_once(command, "--workers 4", "--workers 2")
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "mlflow-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*service["entrypoint"], command],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 600  # first start: every migration of both stores
            while True:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(uri + "/health", timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield uri
        finally:
            stop_group(proc)


def artifact_bucket() -> str:
    (command,) = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["mlflow"][
        "command"
    ]
    return re.search(r"--artifacts-destination s3://([\w.-]+)", command)[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(s3_server(root, buckets=(artifact_bucket(),)))
        pg_port = stack.enter_context(postgres(root))
        uri = stack.enter_context(compose_mlflow(root, pg_port, s3))
        yield {"uri": uri, "s3": s3, "root": root}


# The REST calls of infra/README.md (step 3) and the ones they make possible.
USERS_CREATE = "/api/2.0/mlflow/users/create"
GRANT = "/api/3.0/mlflow/users/permissions/grant"
EXPERIMENTS_CREATE = "/api/2.0/mlflow/experiments/create"
RUNS_CREATE = "/api/2.0/mlflow/runs/create"
ADMIN = ("admin", ADMIN_PASSWORD)
TRAINER_LOGIN = (TRAINER, TRAINER_PASSWORD)


def call(uri: str, path: str, login: tuple[str, str], **body) -> requests.Response:
    return requests.post(uri + path, json=body, auth=login, timeout=30)


@pytest.mark.slow
@pytest.mark.ray
def test_a_training_job_logs_as_a_user_without_admin_rights(server, tmp_path) -> None:
    uri = server["uri"]
    made = call(uri, USERS_CREATE, ADMIN, username=TRAINER, password=TRAINER_PASSWORD)
    assert made.status_code == 200 and made.json()["user"]["is_admin"] is False, made.text
    # The user cannot do what only the admin may, and a wrong password gets nowhere.
    other = {"username": "someone", "password": "p" * 16}
    assert call(uri, USERS_CREATE, TRAINER_LOGIN, **other).status_code == 403
    assert call(uri, EXPERIMENTS_CREATE, (TRAINER, "p" * 16), name="x").status_code == 401
    # An experiment someone else made: no runs until the admin grants EDIT.
    made = call(uri, EXPERIMENTS_CREATE, ADMIN, name="made-by-admin")
    experiment_id = made.json()["experiment_id"]
    assert call(uri, RUNS_CREATE, TRAINER_LOGIN, experiment_id=experiment_id).status_code == 403
    grant = {"resource_type": "experiment", "resource_id": experiment_id, "permission": "EDIT"}
    granted = call(uri, GRANT, ADMIN, username=TRAINER, **grant)
    assert granted.status_code == 200, granted.text
    assert call(uri, RUNS_CREATE, TRAINER_LOGIN, experiment_id=experiment_id).status_code == 200

    # The job: its own experiment (the user creates it), the user's login, no admin password,
    # no bucket credentials (the server proxies artifacts).
    train = ensure_shards(tmp_path / "raw", tmp_path / "shards", "train", 4, 0)
    val = ensure_shards(tmp_path / "raw", tmp_path / "shards", "val", 2, 1)
    sets = {
        "name": "auth", "data.train": train, "data.val": val, "tracking.experiment": "panet-auth",
        "checkpoint.storage_path": tmp_path / "runs", "scaling.num_workers": 1,
        "solver.max_steps": 2, "solver.ims_per_batch": 2, "solver.warmup_steps": 1,
        "log_every": 1, "eval.every_steps": 0, "eval.pictures": 1, "checkpoint.every_steps": 2,
    }  # fmt: skip
    argv = [str(Path(sys.executable).with_name("panet")), "train", "--config", str(CONFIG)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS"))
    }
    env.update(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_TRACKING_USERNAME=TRAINER,
        MLFLOW_TRACKING_PASSWORD=TRAINER_PASSWORD,
    )
    assert ADMIN_PASSWORD not in json.dumps(env) and DB_PASSWORD not in json.dumps(env)
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    # Read back with the same login: the experiment, the run, its metrics and an artifact.
    session = requests.Session()
    session.auth = TRAINER_LOGIN

    def get(endpoint: str, **params) -> dict:
        answer = session.get(uri + endpoint, params=params, timeout=30)
        assert answer.status_code == 200, (endpoint, answer.text)
        return answer.json()

    experiment = get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="panet-auth")[
        "experiment"
    ]
    runs = session.post(
        uri + "/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment["experiment_id"]]},
        timeout=30,
    ).json()["runs"]
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    run_id = runs[0]["info"]["run_id"]
    history = get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/loss")[
        "metrics"
    ]
    assert sorted(m["step"] for m in history) == [1, 2]
    assert {"segm/AP", "bbox/AP"} <= {m["key"] for m in runs[0]["data"]["metrics"]}
    files = get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="predictions")["files"]
    assert files, "no prediction picture"
    picture = session.get(
        f"{uri}/get-artifact", params={"run_uuid": run_id, "path": files[0]["path"]}, timeout=30
    )
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    # ... which the server stored in the artifact bucket with its own credentials.
    s3 = server["s3"]
    bucket = boto3.client(
        "s3",
        endpoint_url=s3["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"],
        region_name=s3["AWS_DEFAULT_REGION"],
    )
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=artifact_bucket())["Contents"]]
    assert f"{experiment['experiment_id']}/{run_id}/artifacts/{files[0]['path']}" in keys, keys
    # The user made the experiment, so it manages it (what the guide says of a first run).
    mine = {"resource_type": "experiment", "resource_id": experiment["experiment_id"]}
    permission = requests.get(
        uri + "/api/3.0/mlflow/users/permissions/get",
        params={"username": TRAINER, **mine},
        auth=ADMIN,
        timeout=30,
    )
    assert "MANAGE" in permission.text, permission.text


def auth_config_template(command: str) -> str:
    """The basic_auth.ini a server command writes (its printf format), hosts left out."""
    fmt = re.search(r"printf '([^']*)'", command)[1]
    return re.sub(r"@[\w.-]+:", "@HOST:", fmt)


def test_compose_and_kubernetes_write_one_auth_config_and_the_guide_makes_this_user() -> None:
    """What the slow test runs stands for both deployments and for the guide's commands."""
    (command,) = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["mlflow"][
        "command"
    ]
    deployment = [
        d
        for d in yaml.safe_load_all((REPO / "infra" / "k8s" / "mlflow" / "mlflow.yaml").read_text())
        if d and d["kind"] == "Deployment"
    ]
    (container,) = deployment[0]["spec"]["template"]["spec"]["containers"]
    k8s = " ".join(container["args"])
    ini = auth_config_template(command)
    assert ini == auth_config_template(k8s)
    assert "database_uri = postgresql://mlflow:%s@HOST:5432/mlflow_auth" in ini
    assert "default_permission = READ" in ini  # a new user reads every experiment, edits none
    # A login is a scrypt hash to check: each worker checks one once a minute, not per request.
    assert "auth_cache_ttl_seconds = 60" in ini
    guide = (REPO / "infra" / "README.md").read_text()
    assert USERS_CREATE in guide and GRANT in guide
    assert f"MLFLOW_TRACKING_USERNAME={TRAINER}" in guide
