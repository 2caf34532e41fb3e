"""The two images' Dockerfiles and lock files, read as a build would run them (no Docker engine
here): the project image's layer order, its CUDA torch and the check of it, and lock files
that pin every package and agree with constraints.txt and pyproject.toml. A broken copy of each
is refused. The slow test resolves both lock files against the package index."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "infra" / "docker"
PROJECT_LOCK = DOCKER / "requirements-panet.txt"
MLFLOW_LOCK = DOCKER / "requirements-mlflow.txt"


def lock_module():
    """infra/docker/lock.py, the script that writes the lock files (not a package)."""
    spec = importlib.util.spec_from_file_location("panet_image_lock", DOCKER / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def constraint_pins() -> dict[str, str]:
    return lock_module().read_pins(REPO / "constraints.txt")


def project_image_errors(text: str) -> list[str]:
    """What is wrong with the project Dockerfile `text`: layer order, torch's index and pins,
    the CUDA check, the lock's install before the code, no-deps install of the project."""
    steps = instructions(text)
    pins = constraint_pins()
    errors = []
    base = re.fullmatch(r"rayproject/ray:(\S+)-py311-(cu\d+)", steps[0][1]) if steps else None
    if base is None:
        return ["the first instruction is not FROM rayproject/ray:<version>-py311-cu<NNN>"]
    cuda_tag = base[2]  # cu128: the base image's CUDA and torch's must be one version
    cuda = f"{cuda_tag[2:-1]}.{cuda_tag[-1]}"
    if base[1] != pins["ray"]:
        errors.append(f"base image Ray {base[1]} but constraints.txt pins {pins['ray']}")
    runs = [(i, args) for i, (op, args) in enumerate(steps) if op == "RUN"]
    torch_runs = [(i, a) for i, a in runs if re.search(r"\btorch==", a)]
    if "--extra-index-url" in text:
        errors.append("--extra-index-url: pip would take torch from PyPI's default build")
    if len(torch_runs) != 1:
        return [*errors, "torch is not installed by exactly one RUN"]
    torch_at, torch_run = torch_runs[0]
    index = f"--index-url https://download.pytorch.org/whl/{cuda_tag}"
    if index not in torch_run:
        errors.append(f"torch is not installed from {index}")
    for name in ("torch", "torchvision"):
        if f"{name}=={pins[name]}+{cuda_tag}" not in torch_run.split():
            errors.append(f"{name} is not pinned as {name}=={pins[name]}+{cuda_tag}")
    if f"torch.version.cuda.startswith('{cuda}')" not in torch_run:
        errors.append(f"the torch layer does not assert torch.version.cuda starts with {cuda}")
    lock_copy = [i for i, (op, a) in enumerate(steps) if op == "COPY" and PROJECT_LOCK.name in a]
    lock_run = [i for i, a in runs if f"-r /tmp/{PROJECT_LOCK.name}" in a]
    code = [i for i, (op, a) in enumerate(steps) if op == "COPY" and PROJECT_LOCK.name not in a]
    project = [i for i, a in runs if re.search(r"pip install .*--no-deps \.( |$)", a)]
    if not lock_copy or not lock_run:
        errors.append(f"{PROJECT_LOCK.name} is not copied and installed with pip install -r")
    elif not torch_at < lock_copy[0] < lock_run[0] < min(code or [len(steps)]):
        errors.append("the layers are not torch, then the lock, then the code")
    if not project or not code or project[0] < max(code):
        errors.append("the project is not installed with --no-deps after its code is copied")
    if re.search(r"^ENV .*RAY_AUTH_MODE", text, re.M):
        errors.append("RAY_AUTH_MODE in the image: KubeRay's authOptions sets it")
    return errors


def test_project_image_layers_torch_index_and_cuda_check() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert project_image_errors(text) == []
    code_first = text.replace(
        "COPY --chown=ray:users infra/docker/requirements-panet.txt",
        "COPY --chown=ray:users pipeline ./pipeline\nCOPY --chown=ray:users "
        "infra/docker/requirements-panet.txt",
    )
    for bad, needle in (
        (text.replace("--index-url", "--extra-index-url"), "--extra-index-url"),
        (text.replace("torch==2.14.1+cu128", "torch==2.14.1"), "torch is not pinned"),
        (text.replace("startswith('12.8')", "startswith('12')"), "does not assert"),
        (text.replace("whl/cu128", "whl/cu130"), "is not installed from"),
        (code_first, "not torch, then the lock, then the code"),
        (text.replace("--no-deps .", "."), "--no-deps"),
        (text.replace("ENV PYTHONUNBUFFERED=1", "ENV RAY_AUTH_MODE=token"), "RAY_AUTH_MODE"),
        (text.replace("FROM rayproject/ray:2.60.0", "FROM rayproject/ray:2.59.0"), "Ray 2.59"),
    ):
        errors = project_image_errors(bad)
        assert any(needle in e for e in errors), (needle, errors)


def lock_errors(pins: dict[str, str], mlflow: dict[str, str]) -> list[str]:
    """Where the two locks disagree with constraints.txt, pyproject.toml or what they serve."""
    constraints = constraint_pins()
    errors = []
    if {"torch", "torchvision"} & set(pins):
        errors.append("torch in the project lock: the Dockerfile installs it from the CUDA index")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        if name in ("torch", "torchvision"):
            continue
        if name not in pins:
            errors.append(f"{name} (pyproject.toml) is not in the project lock")
        elif not dep.specifier.contains(pins[name], prereleases=True):
            errors.append(f"{name}=={pins[name]} breaks pyproject.toml's {dep}")
    for name in ("ray", "mlflow"):
        if pins.get(name) != constraints[name]:
            errors.append(f"{name}=={pins.get(name)} but constraints.txt pins {constraints[name]}")
    if mlflow.get("mlflow") != constraints["mlflow"]:
        errors.append(f"the MLflow image's mlflow=={mlflow.get('mlflow')} is not the client's")
    # basic-auth's CSRF forms, SQLAlchemy 2.1's postgresql:// driver, the S3 artifact store
    for name in ("flask-wtf", "psycopg", "psycopg-binary", "boto3"):
        if name not in mlflow:
            errors.append(f"{name} is not in the MLflow image's lock")
    return errors


def test_lock_files_pin_everything_and_agree_with_the_project(tmp_path: Path) -> None:
    read_pins = lock_module().read_pins
    pins, mlflow = read_pins(PROJECT_LOCK), read_pins(MLFLOW_LOCK)
    assert len(pins) > 50 and len(mlflow) > 50  # whole closures, not the top-level names
    assert lock_errors(pins, mlflow) == []
    for bad_pins, bad_mlflow, needle in (
        ({**pins, "ray": "2.59.0"}, mlflow, "ray==2.59.0"),
        ({**pins, "torch": "2.14.1"}, mlflow, "torch in the project lock"),
        ({k: v for k, v in pins.items() if k != "pycocotools"}, mlflow, "pycocotools"),
        ({**pins, "numpy": "1.20.0"}, mlflow, "numpy==1.20.0"),
        (pins, {k: v for k, v in mlflow.items() if k != "flask-wtf"}, "flask-wtf"),
        (pins, {**mlflow, "mlflow": "3.16.0"}, "is not the client's"),
    ):
        errors = lock_errors(bad_pins, bad_mlflow)
        assert any(needle in e for e in errors), (needle, errors)
    # Every line of a lock is name==version: a range or a bare name is refused.
    broken = tmp_path / PROJECT_LOCK.name
    broken.write_text(PROJECT_LOCK.read_text().replace("\nray==", "\nray>=", 1))
    with pytest.raises(ValueError, match=r"requirements-panet.txt:\d+: not pinned .*'ray>="):
        read_pins(broken)


def test_mlflow_image_installs_its_lock_and_sends_nothing_else() -> None:
    steps = instructions((DOCKER / "mlflow.Dockerfile").read_text())
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.11-slim-\w+", steps[0][1])
    assert ("COPY", f"{MLFLOW_LOCK.name} /tmp/{MLFLOW_LOCK.name}") in steps
    (install,) = [a for op, a in steps if op == "RUN" and "pip install" in a]
    assert f"pip install --no-cache-dir -r /tmp/{MLFLOW_LOCK.name}" in install
    assert "import flask_wtf, psycopg, boto3, mlflow.server.auth" in install
    # The build context is infra/docker, which holds .env: only the lock file goes in.
    ignore = (DOCKER / "mlflow.Dockerfile.dockerignore").read_text().split("\n")
    assert [line for line in ignore if line and not line.startswith("#")] == [
        "*",
        f"!{MLFLOW_LOCK.name}",
    ]


@pytest.mark.slow
def test_lock_files_resolve_as_pinned() -> None:
    """pip's resolver, on the images' platform, installs exactly each lock file's pins."""
    done = subprocess.run(
        [sys.executable, str(DOCKER / "lock.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "both lock files resolve as pinned" in done.stdout
