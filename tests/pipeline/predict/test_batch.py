"""Ray Data batch inference: an actor pool of replicas gives `panet predict`'s detections."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.predict.batch import build_dataset
from tests.pipeline.predict.conftest import VAL_IMAGES, assert_same_detections

pytestmark = pytest.mark.ray


def predict(model: str, inputs: list[str], out, *extra: str) -> tuple[list[dict], dict]:
    args = ["predict", "--model", model, *inputs, "--out", str(out), "--score-threshold", "0.3"]
    args += ["--max-detections", "5"]  # an untrained model: enough to compare, cheap to draw
    assert main([*args, "--device", "cpu", *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    return results, json.loads((out / "images.json").read_text())


def test_ray_data_replicas_give_the_detections_of_panet_predict(
    untrained_checkpoint, val_shards, photos, tmp_path, capsys
) -> None:
    import ray

    inputs = [
        str(val_shards),
        str(photos["chelsea_palette.png"]),
        str(photos["truncated.jpg"]),
    ]
    expected, expected_meta = predict(str(untrained_checkpoint), inputs, tmp_path / "plain")
    threads = torch.get_num_threads()  # each replica computes with the plain loop's threads
    ray.init(num_cpus=2 * threads + 2, include_dashboard=False)
    try:
        got, meta = predict(
            str(untrained_checkpoint),
            inputs,
            tmp_path / "ray",
            "--ray",
            "--replicas",
            "2",
            "--batch-size",
            "3",
            "--cpus-per-replica",
            str(threads),
        )
        # A shard file is one block of its reader: the replicas share its images in batches.
        blocks = build_dataset([], [str(val_shards)], 3).materialize()
        sizes = [b.num_rows for b in blocks.iter_batches(batch_size=None, batch_format="pyarrow")]
    finally:
        ray.shutdown()
    assert sum(sizes) == VAL_IMAGES and max(sizes) <= 3 and len(sizes) >= VAL_IMAGES / 3
    assert len(expected) > 20
    assert_same_detections(got, expected)
    assert meta == expected_meta
    assert [s["file_name"] for s in meta["skipped"]] == [str(photos["truncated.jpg"])]
    captured = capsys.readouterr()
    assert "truncated.jpg" in captured.err and "images/s" in captured.out
    # Parquet: one row per input image, the unreadable one with its reason.
    table = pq.read_table(tmp_path / "ray" / "predictions").to_pylist()
    assert len(table) == VAL_IMAGES + 2
    errors = [r for r in table if r["error"]]
    assert len(errors) == 1 and "truncated.jpg" in errors[0]["error"]
    assert sum(len(r["scores"]) for r in table) == len(got)
    pictures = list((tmp_path / "ray" / "pictures").iterdir())
    assert len(pictures) == VAL_IMAGES + 1
