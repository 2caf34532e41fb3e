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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_replicas_each_reserve_a_gpu(untrained_checkpoint, val_shards, tmp_path, capsys):
    import ray

    gpus = torch.cuda.device_count()
    args = ["predict", "--model", str(untrained_checkpoint), str(val_shards), "--ray"]
    args += ["--device", "cuda", "--no-pictures", "--max-detections", "5"]
    ray.init(num_cpus=4, num_gpus=gpus, include_dashboard=False)
    try:
        assert main([*args, "--out", str(tmp_path / "gpu"), "--replicas", str(gpus)]) == 0
        assert f"{gpus} replicas x 1 GPU" in capsys.readouterr().out
        # One replica more than the GPUs: refused, not left waiting for a GPU.
        code = main([*args, "--out", str(tmp_path / "more"), "--replicas", str(gpus + 1)])
        assert code == 2 and f"need {gpus + 1} GPUs" in capsys.readouterr().err
    finally:
        ray.shutdown()
    images = json.loads((tmp_path / "gpu" / "images.json").read_text())
    assert len(images["images"]) == VAL_IMAGES
