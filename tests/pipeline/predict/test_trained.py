"""With a model trained by `panet train`: the test-time tricks through the COCO evaluation, and
its MLflow model loaded in a fresh process against its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.data.shards import load_manifest, shard_paths
from tests.pipeline.predict.conftest import assert_same_detections

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def val_batches(shard_dir: Path) -> list:
    """Every validation record as a one-image (images, targets) batch, at its original size."""
    from pipeline.data.augment import decode_image

    batches = []
    for path in shard_paths(load_manifest(shard_dir), shard_dir):
        for row in pq.read_table(
            path, columns=["image_id", "height", "width", "image"]
        ).to_pylist():
            rgb = decode_image(row["image"], row["height"], row["width"])
            image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
            batches.append(([image], [{"image_id": row["image_id"]}]))
    return batches


def predict(checkpoint_or_uri: str, inputs: list[str], out: Path, *extra: str) -> list[dict]:
    args = ["predict", "--model", checkpoint_or_uri, *inputs, "--out", str(out)]
    args += ["--score-threshold", "0.05", "--no-pictures", "--device", "cpu", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_flip_and_multiscale_testing_do_not_lower_segm_ap(learned, val_shards, capsys) -> None:
    from panet_model.config import TestConfig as Tricks
    from pipeline.evaluate import coco_evaluate, coco_ground_truth, evaluate_model
    from pipeline.predict.predictor import load_predictor

    predictor = load_predictor(str(learned), score_threshold=0.0)
    model, labels = predictor.model, predictor.inverse_labels
    gt = coco_ground_truth(val_shards)
    batches = val_batches(val_shards)
    test_scale = model.transform.min_size[-1]
    tricks = {
        "plain": Tricks(),
        "flip": Tricks(flip=True),
        "multi-scale": Tricks(scales=(test_scale - 32, test_scale, test_scale + 32)),
        "flip + multi-scale": Tricks(
            scales=(test_scale - 32, test_scale, test_scale + 32), flip=True
        ),
        "box voting": Tricks(box_vote=True),
        "mask voting": Tricks(mask_vote=True),
    }
    ap = {}
    for name, test in tricks.items():
        model.test = test
        metrics = coco_evaluate(gt, evaluate_model(model, batches, labels, "cpu"))
        ap[name] = (metrics["bbox/AP"], metrics["segm/AP"])
    with capsys.disabled():
        print(f"\n[tta] AP of the {len(batches)} validation images (bbox, segm):")
        for name, (box, segm) in ap.items():
            print(f"[tta]   {name:<20} {box:.3f}  {segm:.3f}")
    plain = ap["plain"][1]
    assert plain > 0.05, "the fixture model did not learn"
    for name in ("flip", "multi-scale", "flip + multi-scale"):
        assert ap[name][1] >= plain, f"{name} lowered segm AP: {ap[name][1]:.4f} < {plain:.4f}"


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


@pytest.mark.ray
def test_panet_eval_set_evaluates_with_the_tricks(learned, val_shards, capsys) -> None:
    """`panet eval --set model.test.*` runs the same COCO evaluation with the tricks on."""
    from panet_model.config import TestConfig as Tricks
    from pipeline.evaluate import coco_evaluate, coco_ground_truth, evaluate_model
    from pipeline.predict.predictor import load_predictor

    predictor = load_predictor(str(learned), score_threshold=0.0)
    predictor.model.test = Tricks(flip=True, box_vote=True)
    batches = val_batches(val_shards)
    gt = coco_ground_truth(val_shards)
    expected = coco_evaluate(
        gt, evaluate_model(predictor.model, batches, predictor.inverse_labels, "cpu")
    )
    args = ["eval", "--checkpoint", str(learned), "--data", str(val_shards)]
    args += ["--workers", "1", "--batch-size", "1"]
    assert main([*args, "--set", "model.test.flip=true", "--set", "model.test.box_vote=true"]) == 0
    printed = capsys.readouterr().out
    segm = next(line for line in printed.splitlines() if line.startswith("segm"))
    assert float(segm.split()[1]) == pytest.approx(expected["segm/AP"], abs=5e-4)
