"""What a job takes to the cluster: the working dir (with staged files) and the pinned packages.

The runtime env ships the project directory (minus what `.rayignore` leaves out: data, shards,
runs, `.venv`, caches), a config from outside it, and the dependencies pinned by
`constraints.txt` (or nothing, with `--no-pip`, on an image that holds them).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
from collections.abc import Iterator
from importlib.metadata import requires
from pathlib import Path
from typing import Any

import tomllib

from pipeline.submit import SubmitError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Where a config from outside the working dir is put for the upload (removed once uploaded).
STAGED_DIR = ".panet-submit"
# Installed on the cluster by `ray` itself: never reinstalled by a job's runtime env.
NOT_PIPPED = ("ray",)


def pinned_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """The project's dependencies with the versions of `constraints.txt` (ray left out).

    Args:
        root: the directory holding pyproject.toml and constraints.txt.

    Returns:
        pip requirement strings, e.g. `["torch==2.14.1", ..., "pyyaml>=6"]`.
    """
    try:
        deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    except ImportError:  # Python 3.10: the installed package's own metadata
        deps = [r for r in requires("panet-on-ray") or [] if "extra ==" not in r]
    pins: dict[str, str] = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[_dist_name(line)] = line
    out = []
    for dep in deps:
        name = _dist_name(dep)
        if name in NOT_PIPPED:
            continue
        out.append(pins.get(name, dep))
    return out


def _dist_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].strip().lower()


def working_dir(args: argparse.Namespace) -> Path:
    """The directory uploaded: --working-dir, else the checkout this `panet` runs from."""
    if args.working_dir:
        path = Path(args.working_dir).resolve()
        if not path.is_dir():
            raise SubmitError(f"--working-dir {str(path)!r} is not a directory")
        return path
    if not (PROJECT_ROOT / "pyproject.toml").is_file():  # an installed copy: site-packages
        raise SubmitError(
            "panet is installed, not run from a checkout: pass --working-dir (the directory to "
            "upload, e.g. your configs) and --no-pip if the cluster's image holds the project"
        )
    return PROJECT_ROOT


def runtime_env(args: argparse.Namespace) -> dict[str, Any]:
    """The job's runtime env: the working dir and, unless --no-pip, the pinned pip packages."""
    env: dict[str, Any] = {
        "working_dir": str(working_dir(args)),
        "env_vars": {"PYTHONUNBUFFERED": "1"},  # log lines reach the stream as they are printed
    }
    if not args.no_pip:
        if not (PROJECT_ROOT / "constraints.txt").is_file():
            raise SubmitError(
                "the pins to install are in a checkout's constraints.txt, and panet is installed: "
                "pass --no-pip (the cluster's image holds the project) or run from a checkout"
            )
        env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    return env


@contextlib.contextmanager
def staged_files(wd: Path, staged: dict[str, Path]) -> Iterator[None]:
    """Copy each staged file into the working dir for the upload, and remove the copies after."""
    made = []
    try:
        for rel, source in staged.items():
            target = wd / rel
            try:
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)
            except OSError as err:
                raise SubmitError(f"cannot put {source} into the working dir: {err}") from err
            made.append(target)
        yield
    finally:
        for target in made:
            target.unlink(missing_ok=True)
        for parent in {t.parent for t in made}:
            with contextlib.suppress(OSError):  # not empty: another submit is staging too
                parent.rmdir()
