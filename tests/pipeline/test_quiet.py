"""What `panet train` prints, as a user runs it: the run, not Ray's chatter.

One 2-step training run, the console script in a subprocess with its own local Ray instance; its
output is read for each expected message of Ray or MLflow that looks like a problem. (`panet
eval` connects to Ray and quiets it through the same `pipeline.ray_session` and `pipeline.quiet`;
it runs on a job directory in tests/pipeline/train/test_learning.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.demo import ensure_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"
NOISE = (
    "Token authentication is enabled",  # Ray's notice on a new local instance
    "tqdm is not installed",  # Ray Data's progress bars on the driver
    "RayDeprecationWarning",  # raised by Ray Train's own ingest defaults
    "PreemptionWatcher",  # an error-level core_worker.cc line at every worker-group start
    "Saving pytorch model by Pickle",  # MLflow's caution for the model logged on purpose
    "Reporting training result",  # every rank's report, placeholder metrics included
    "'segm_AP': -1.0",
)


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("quiet")
    train = ensure_shards(root / "raw", root / "shards", "train", 8, 0)
    val = ensure_shards(root / "raw", root / "shards", "val", 4, 1)
    sets = {
        "name": "quiet",
        "data.train": train,
        "data.val": val,
        "checkpoint.storage_path": root / "runs",
        "solver.max_steps": 2,
        "solver.ims_per_batch": 2,
        "solver.warmup_steps": 1,
        "log_every": 1,
        "eval.every_steps": 0,
        "eval.pictures": 1,
        "checkpoint.every_steps": 2,
    }
    argv = [str(Path(sys.executable).with_name("panet")), "train", "--config", str(CONFIG)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def test_a_run_prints_no_expected_noise(run_output: str) -> None:
    assert "[train] step 2/2" in run_output and "COCO metrics of the last evaluation" in run_output
    assert "model logged to MLflow" in run_output  # the step that used to warn about pickle
    found = [text for text in NOISE if text in run_output]
    assert not found, f"noise in the output: {found}"


def test_the_printed_ui_command_names_the_venv_script(run_output: str) -> None:
    line = run_output.split("Open the MLflow UI:\n", 1)[1].splitlines()[0].strip()
    mlflow = tracking.script_command("mlflow")
    assert Path(mlflow).is_absolute() and f" {mlflow} server " in f" {line} "
