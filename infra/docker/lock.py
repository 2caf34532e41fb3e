"""Write (or check) the pinned pip requirements of the two images.

    .venv/bin/python infra/docker/lock.py           # rewrite both files from the registry
    .venv/bin/python infra/docker/lock.py --check   # resolve each file as written; fail on drift

requirements-panet.txt: every runtime dependency of pyproject.toml at the versions of
constraints.txt, torch and torchvision left out (the Dockerfile installs them in a layer of their
own, from PyTorch's CUDA 12.8 index). requirements-mlflow.txt: MLflow with its `auth` extra (the
basic-auth app needs Flask-WTF), the PostgreSQL driver (psycopg) and the S3 client (boto3).

Both are resolved by pip's own resolver (`pip install --dry-run --report`) for what the images
run: CPython 3.11 on x86_64 Linux with glibc 2.35 or newer, binary wheels only, so a package
built for a newer glibc than the images' cannot slip in from the machine that writes the lock.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PANET_LOCK = HERE / "requirements-panet.txt"
MLFLOW_LOCK = HERE / "requirements-mlflow.txt"
# Installed in the project image's own layer from the CUDA index, not from the lock.
TORCH = {"torch", "torchvision"}
# Ubuntu 22.04 (Ray's images) has glibc 2.35, Debian 12 (python:3.11-slim-bookworm) 2.36.
GLIBC_MINOR = 35
TARGET = [
    *(f"--platform=manylinux_2_{m}_x86_64" for m in range(GLIBC_MINOR, 16, -1)),
    "--platform=manylinux2014_x86_64",
    "--platform=linux_x86_64",
    "--python-version=3.11",
    "--implementation=cp",
    "--abi=cp311",
    "--only-binary=:all:",
]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file; any line that is not `name==version` fails."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: not pinned as name==version: {line!r}")
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def resolve(requirements: list[str], constraints: Path | None = None) -> dict[str, str]:
    """What pip would install for `requirements` on the images' platform: {name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        cmd += ["--quiet", "--report", str(report), *TARGET]
        if constraints is not None:
            cmd += ["-c", str(constraints)]
        subprocess.run([*cmd, *requirements], check=True)
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def panet_inputs() -> list[str]:
    """The project's runtime dependencies without torch and torchvision."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if canonicalize_name(Requirement(d).name) not in TORCH]


def mlflow_inputs() -> list[str]:
    """The MLflow server image: the client version of constraints.txt, with its auth extra.

    psycopg 3, not psycopg2: SQLAlchemy 2.1 connects `postgresql://` URIs (the manifests') with it.
    """
    version = read_pins(REPO / "constraints.txt")["mlflow"]
    return [f"mlflow[auth]=={version}", "psycopg[binary]", "boto3"]


def write(path: Path, purpose: str, inputs: list[str], pins: dict[str, str]) -> None:
    header = [
        f"# {purpose}",
        "# Resolved from: " + " ".join(inputs),
        "# for CPython 3.11, x86_64 Linux (glibc >= 2.35). Do not edit: regenerate with",
        "#   .venv/bin/python infra/docker/lock.py",
    ]
    body = [f"{name}=={version}" for name, version in sorted(pins.items())]
    path.write_text("\n".join(header + body) + "\n")


def check(path: Path) -> list[str]:
    """Resolve the lock file as written: every pin must hold and nothing may be missing."""
    pins = read_pins(path)
    resolved = resolve(["-r", str(path)])
    problems = [
        f"{path.name}: {name} resolves to {version}, pinned {pins.get(name)}"
        for name, version in sorted(resolved.items())
        if pins.get(name) != version
    ]
    unused = sorted(set(pins) - set(resolved))
    return problems + [f"{path.name}: {name} is pinned but not needed" for name in unused]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="resolve the files as written")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(PANET_LOCK) + check(MLFLOW_LOCK)
        print("\n".join(problems) or "both lock files resolve as pinned")
        return 1 if problems else 0
    inputs = panet_inputs()
    pins = resolve(inputs, REPO / "constraints.txt")
    assert not TORCH & set(pins), "a dependency other than torchvision pulls in torch"
    write(PANET_LOCK, "The project image's dependencies (infra/docker/Dockerfile).", inputs, pins)
    inputs = mlflow_inputs()
    write(MLFLOW_LOCK, "The MLflow server image (mlflow.Dockerfile).", inputs, resolve(inputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
