"""The project as the image installs it: a non-editable wheel, used from outside a checkout.

The wheel is built from a copy of the sources and installed with `--no-deps` into a fresh venv
that borrows the heavy dependencies from the test venv through a `.pth` line (a path line, so
the test venv's own `.pth` files, among them the editable install's finder, are not run).
Every command runs from an empty directory, so only the installed copy can answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "panet_model", "pipeline", "jobs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh venv holding the wheel: its python, its `panet`, its site-packages, a cwd."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: no stale build/ of the checkout ends up in the wheel
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)])
    (wheel,) = (root / "dist").glob("panet_on_ray-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)])
    cwd = root / "elsewhere"
    cwd.mkdir()
    return {"python": python, "panet": venv / "bin" / "panet", "site": site, "cwd": cwd}


def run(cmd: list, cwd: Path | None = None, code: int = 0) -> subprocess.CompletedProcess:
    """Run `cmd` without PYTHONPATH (which could reach the checkout); expect exit code `code`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == code, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.slow
def test_the_installed_wheel_runs_shipped_sweeps_configs_and_entrypoints(installed) -> None:
    py, panet, site, cwd = (installed[k] for k in ("python", "panet", "site", "cwd"))
    # The code is the wheel's copy, not the checkout's (no editable finder, no PYTHONPATH).
    where = run([py, "-c", "import pipeline, jobs; print(pipeline.__file__, jobs.__file__)"], cwd)
    assert where.stdout.split() == [
        str(site / "pipeline" / "__init__.py"),
        str(site / "jobs" / "__init__.py"),
    ]
    shipped = site / "jobs" / "configs" / "tiny_synth.yaml"
    assert shipped.is_file() and (site / "jobs" / "sweeps" / "table3.yaml").is_file()

    for config in ("tiny_synth", shipped):  # by name, and by the installed file's path
        out = run([panet, "tune", "--sweep", "table3", "--config", config, "--dry-run"], cwd)
        assert "sweep 'table3': 9 trial(s)" in out.stdout and "panet-noMBN" in out.stdout
    out = run([panet, "tune", "--sweep", "demo", "--dry-run"], cwd)  # the sweep's own config
    assert "sweep 'demo': 6 trial(s)" in out.stdout

    out = run([py, "-m", "jobs.train", "--help"], cwd)
    assert out.stdout.startswith("usage: panet train")
    # `panet train` loads a shipped config by name: its check names the overridden key.
    bad = [panet, "train", "--config", "tiny_synth", "--set", "solver.max_steps=0"]
    err = run(bad, cwd, code=2).stderr
    assert "panet train: error: config key 'solver.max_steps'" in err
    err = run([panet, "train", "--config", "jobs/configs/tiny_synth.yaml"], cwd, code=2).stderr
    assert "'jobs/configs/tiny_synth.yaml' does not exist" in err
    assert "shipped configs, by name: cityscapes_panet_r50, coco_panet_r50" in err

    # `panet submit` from an installed copy has no checkout to upload or pins to install.
    submit = [panet, "submit", "train", "--address", "http://127.0.0.1:1", "--config", "tiny_synth"]
    err = run(submit, cwd, code=2).stderr
    assert "panet is installed, not run from a checkout: pass --working-dir" in err
    shared = ["data.train=/d/train", "data.val=/d/val", "checkpoint.storage_path=/d/runs"]
    shared.append("tracking.uri=http://mlflow:5000")
    submit += ["--working-dir", cwd, "--no-data-check", *(x for s in shared for x in ("--set", s))]
    err = run(submit, cwd, code=2).stderr  # checked, the config staged: then no pins to install
    assert "constraints.txt, and panet is installed: pass --no-pip" in err
