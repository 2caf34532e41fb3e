"""`panet predict` on real photographs: COCO results, one picture per image, bad files skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.cli import main
from tests.pipeline.predict.conftest import CATEGORIES


def run_predict(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_photographs_writes_coco_results_and_pictures(
    photos, untrained_checkpoint, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    folder = photos["astronaut.png"].parent
    code, stdout, stderr = run_predict(
        capsys,
        "--model",
        str(untrained_checkpoint),
        str(folder),
        "--out",
        str(out),
        "--score-threshold",
        "0",
        "--max-detections",
        "7",
        "--device",
        "cpu",
    )
    assert code == 0, stderr
    # The unreadable files are reported by name; everything else has results.
    assert "truncated.jpg" in stderr and "not_an_image.png" in stderr
    meta = json.loads((out / "images.json").read_text())
    names = {i["file_name"].rsplit("/", 1)[-1]: i for i in meta["images"]}
    readable = set(photos) - {"truncated.jpg", "not_an_image.png"}
    assert set(names) == readable
    assert {s["file_name"].rsplit("/", 1)[-1] for s in meta["skipped"]} == {
        "truncated.jpg",
        "not_an_image.png",
    }
    assert meta["categories"] == [{"id": k, "name": v} for k, v in CATEGORIES.items()]
    assert names["coffee_exif6.jpg"]["height"] == 400 and names["coffee_exif6.jpg"]["width"] == 600
    results = json.loads((out / "results.json").read_text())
    by_image: dict[int, int] = {}
    sizes = {i["id"]: (i["height"], i["width"]) for i in meta["images"]}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert r["category_id"] in CATEGORIES and 0 <= r["score"] <= 1 and len(r["bbox"]) == 4
        h, w = sizes[r["image_id"]]
        assert r["segmentation"]["size"] == [h, w]
        assert mask_utils.decode(r["segmentation"]).shape == (h, w)
        by_image[r["image_id"]] = by_image.get(r["image_id"], 0) + 1
    assert set(by_image) == set(sizes) and max(by_image.values()) <= 7
    # One picture per readable image, a real PNG with the detections drawn.
    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert len(pictures) == len(readable)
    png = np.asarray(Image.open(out / "pictures" / pictures[0]))
    assert png.ndim == 3 and png.shape[1] > 600
    assert f"done: {len(readable)} of {len(photos)} images predicted" in stdout


def test_the_summary_counts_skipped_and_upscaled_images_alike_and_by_id(
    untrained_checkpoint, tmp_path, capsys
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    small, photo = tmp_path / "small.png", tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 40, 40)).save(small)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8)).save(photo)
    out = tmp_path / "out"
    args = ["--model", str(untrained_checkpoint), str(broken), str(small), str(photo), "--out"]
    few = ["--score-threshold", "0", "--max-detections", "3", "--no-pictures"]
    code, stdout, stderr = run_predict(capsys, *args, str(out), *few)
    assert code == 0, stderr
    # Ids are input positions: the unreadable first file keeps id 1, and the output says so.
    assert "skipped image 1: " in stderr and "broken.png" in stderr
    meta = json.loads((out / "images.json").read_text())
    assert [s["id"] for s in meta["skipped"]] == [1]
    assert [(i["id"], i["file_name"]) for i in meta["images"]] == [(2, str(small)), (3, str(photo))]
    # The tiny preset's test scale is 256: the 8x8 image is upscaled 32x, and named for it.
    assert [i["scale"] for i in meta["images"]] == [32.0, pytest.approx(256 / 120, abs=1e-3)]
    assert "warning: image 2 (" in stderr and "is 8x8" in stderr and "32x to 256x256" in stderr
    assert "image 3 (" not in stderr
    # The last progress line and the final line agree on every count.
    progress = [line for line in stdout.splitlines() if "images read" in line][-1]
    detections = len(json.loads((out / "results.json").read_text()))
    assert f"3/3 images read: 2 predicted, 1 skipped, {detections} detections" in progress
    done = stdout.splitlines()[-1]
    assert done.startswith(f"[predict] done: 2 of 3 images predicted, {detections} detections")
    assert "1 skipped (their image ids left unused)" in done and "1 upscaled over 4x" in done


def test_score_threshold_and_max_detections_filter(
    photos, untrained_checkpoint, tmp_path, capsys
) -> None:
    def count(threshold: str, most: str) -> list[dict]:
        out = tmp_path / f"{threshold}-{most}"
        code, _, err = run_predict(
            capsys,
            "--model",
            str(untrained_checkpoint / "state.pt"),
            str(photos["chelsea_large.jpg"]),
            "--out",
            str(out),
            "--score-threshold",
            threshold,
            "--max-detections",
            most,
            "--no-pictures",
        )
        assert code == 0, err
        assert not (out / "pictures").exists()
        return json.loads((out / "results.json").read_text())

    everything = count("0", "100")
    assert len(everything) == 100
    scores = sorted((r["score"] for r in everything), reverse=True)
    top = count("0", "5")
    assert [r["score"] for r in top] == pytest.approx(scores[:5])
    cut = scores[20]
    above = count(str(cut), "100")
    assert len(above) == sum(s >= cut for s in scores)


def test_bad_requests_fail_before_loading_with_one_line(untrained_checkpoint, tmp_path, capsys):
    code, _, err = run_predict(
        capsys, "--model", str(untrained_checkpoint), str(tmp_path / "x.jpg")
    )
    assert code == 2 and "x.jpg' does not exist" in err
    img = tmp_path / "one.png"
    Image.new("RGB", (40, 30)).save(img)
    code, _, err = run_predict(capsys, "--model", str(tmp_path / "nope"), str(img))
    assert code == 2 and "nope" in err
    code, _, err = run_predict(capsys, "--model", "models:/m1", str(img))
    assert code == 2 and "--tracking-uri" in err
    code, _, err = run_predict(
        capsys, "--model", str(untrained_checkpoint), str(img), "--set", "solver.base_lr=1"
    )
    assert code == 2 and "only model.* keys apply" in err
    code, _, err = run_predict(
        capsys, "--model", str(untrained_checkpoint), str(img), "--set", "model.test.flip=3"
    )
    assert code == 2 and "test.flip" in err
    code, _, err = run_predict(
        capsys, "--model", str(untrained_checkpoint), str(img), "--score-threshold", "2"
    )
    assert code == 2 and "--score-threshold" in err


def test_all_inputs_unreadable_exits_nonzero(photos, untrained_checkpoint, tmp_path, capsys):
    code, _, err = run_predict(
        capsys,
        "--model",
        str(untrained_checkpoint),
        str(photos["truncated.jpg"]),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 1 and "truncated.jpg" in err


def test_panet_eval_set_is_checked_before_ray(untrained_checkpoint, tmp_path, capsys) -> None:
    from pipeline.demo import ensure_shards

    shards = ensure_shards(tmp_path / "raw", tmp_path / "shards", "val", 2, 1)
    args = ["eval", "--checkpoint", str(untrained_checkpoint), "--data", str(shards)]
    assert main([*args, "--set", "model.test.flip=maybe"]) == 2
    assert "test.flip" in capsys.readouterr().err
    assert main([*args, "--set", "solver.base_lr=1"]) == 2
    assert "only model.* keys apply" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "gpus", "plan"),
    [
        ("cuda", None, ("cuda", 1.0)),  # a GPU each unless told otherwise
        ("cuda", 0.5, ("cuda", 0.5)),  # two replicas a GPU, asked for
        ("auto", 1.0, ("cuda", 1.0)),
        ("auto", None, ("cpu", 0.0)),
        ("cpu", None, ("cpu", 0.0)),
    ],
)
def test_ray_replicas_on_cuda_reserve_their_gpus(device, gpus, plan) -> None:
    from pipeline.predict.batch import replica_device

    assert replica_device(device, gpus) == plan


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cuda", "--gpus-per-replica", "0"], "--gpus-per-replica 0"),
        (["--device", "cuda:1"], "use --device cuda"),
        (["--device", "cpu", "--gpus-per-replica", "1"], "--device cpu does not use"),
        (["--device", "cuda", "--gpus-per-replica", "-1"], "must be >= 0"),
    ],
)
def test_replica_gpu_requests_that_would_misplace_them_fail_before_loading(
    tmp_path, capsys, flags, message
) -> None:
    img = tmp_path / "one.png"
    Image.new("RGB", (40, 30)).save(img)
    # A model that does not exist: the flags are refused before it would be loaded.
    code, _, err = run_predict(
        capsys, "--model", str(tmp_path / "no-model"), str(img), "--ray", *flags
    )
    assert code == 2 and message in err and "no-model" not in err


def test_replica_gpus_are_checked_against_the_cluster_and_its_autoscaler() -> None:
    from pipeline.predict.batch import check_replica_gpus

    check_replica_gpus(2, 1.0, {"CPU": 8.0, "GPU": 2.0}, {})
    check_replica_gpus(4, 0.5, {"CPU": 8.0, "GPU": 2.0}, {})
    with pytest.raises(ValueError, match="need 3 GPUs, but the cluster has 2"):
        check_replica_gpus(3, 1.0, {"CPU": 8.0, "GPU": 2.0}, {})
    with pytest.raises(ValueError, match="need 2 GPUs, but the cluster has 1"):
        check_replica_gpus(3, 0.5, {"CPU": 8.0, "GPU": 1.0}, {})
    # A KubeRay cluster at zero GPU workers: the replicas wait for the GPU nodes.
    check_replica_gpus(3, 1.0, {"CPU": 8.0}, {"CPU": 224.0, "GPU": 16.0})
    with pytest.raises(ValueError, match="grows to at most 16"):
        check_replica_gpus(17, 1.0, {"CPU": 8.0}, {"CPU": 224.0, "GPU": 16.0})


def test_the_resize_factor_is_the_models_own(untrained_checkpoint) -> None:
    """The factor follows the model's test scale and cap, also under multi-scale testing."""
    from pipeline.predict.predictor import load_predictor

    plain = load_predictor(str(untrained_checkpoint))
    assert plain.input_scale(8, 8) == 32.0  # tiny: short side 256
    assert plain.input_scale(100, 1000) == 0.4  # the long side capped at 400
    tricks = load_predictor(
        str(untrained_checkpoint),
        overrides={"model.test.scales": [512, 384], "model.test.max_size": 800},
    )
    assert tricks.input_scale(8, 8) == 48.0  # the smallest of the test scales
    assert tricks.input_scale(100, 1000) == 0.8
