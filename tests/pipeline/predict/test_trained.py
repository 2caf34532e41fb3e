"""A model trained by `panet train`: its MLflow model loaded in a fresh process against its
checkpoint. (The test-time tricks on a trained model: tests/pipeline/train/test_learning.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.pipeline.predict.conftest import assert_same_detections

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def predict(checkpoint_or_uri: str, inputs: list[str], out: Path, *extra: str) -> list[dict]:
    args = ["predict", "--model", checkpoint_or_uri, *inputs, "--out", str(out)]
    args += ["--score-threshold", "0.05", "--no-pictures", "--device", "cpu", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.ray
def test_mlflow_model_in_a_fresh_process_predicts_like_the_checkpoint(
    trained, val_shards, tmp_path
) -> None:
    val = str(val_shards)
    expected = predict(str(trained["checkpoint"]), [val], tmp_path / "ckpt")
    assert expected
    uri = f"runs:/{trained['run_id']}/model"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "pipeline.cli", "predict", "--model", uri, val]
    cmd += ["--tracking-uri", trained["tracking_uri"], "--out", str(tmp_path / "mlflow")]
    cmd += ["--score-threshold", "0.05", "--no-pictures", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MLflow" in done.stdout
    got = json.loads((tmp_path / "mlflow" / "results.json").read_text())
    assert_same_detections(got, expected)
    # Registered in the model registry, the version loads by name.
    assert (
        main(
            [
                "predict",
                "--model",
                uri,
                "--tracking-uri",
                trained["tracking_uri"],
                "--register",
                "panet-fixture",
            ]
        )
        == 0
    )
    again = predict(
        "models:/panet-fixture/1",
        [val],
        tmp_path / "registry",
        "--tracking-uri",
        trained["tracking_uri"],
    )
    assert again == expected
