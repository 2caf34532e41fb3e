"""COCO instances converter: fixture conformance, bad input, strict, resume, process pool."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.convert_coco import (
    convert_coco,
    plan_coco,
    rle_string_counts,
    segmentation_to_rle,
)
from pipeline.data.manifest import DataError, iter_records
from pipeline.data.plan import BadRecordError, RecordProblem
from pipeline.data.records import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "datumaro"
COCO_DIR = FIXTURES / "coco_dataset" / "coco_instances"


def _decode(rle: str, h: int, w: int) -> np.ndarray:
    return mask_utils.decode({"size": [h, w], "counts": rle.encode()})


def _expand_uncompressed(counts: list[int], h: int, w: int) -> np.ndarray:
    # Independent of pycocotools: runs alternate 0/1, column-major.
    flat = np.concatenate([np.full(c, i % 2, np.uint8) for i, c in enumerate(counts)])
    return flat.reshape((w, h)).T


def _convert(ann: Path, images: Path, out: Path, **kw) -> dict:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return convert_coco(ann, images, out, **kw)


@pytest.mark.parametrize("split", ["train", "val"])
def test_fixture_conformance(tmp_path, split):
    ann_file = COCO_DIR / "annotations" / f"instances_{split}.json"
    image_dir = COCO_DIR / "images" / split
    manifest = _convert(ann_file, image_dir, tmp_path / "out")
    doc = json.loads(ann_file.read_text())
    api = COCO(str(ann_file))
    assert manifest["categories"] == [
        {"id": c["id"], "name": c["name"], "color": manifest["categories"][i]["color"]}
        for i, c in enumerate(doc["categories"])
    ]
    assert all(len(c["color"]) == 3 for c in manifest["categories"])
    records = list(iter_records(tmp_path / "out"))
    assert [r["image_id"] for r in records] == [img["id"] for img in doc["images"]]
    for record, img in zip(records, doc["images"]):
        assert (record["file_name"], record["height"], record["width"]) == (
            img["file_name"],
            img["height"],
            img["width"],
        )
        assert record["image"] == (image_dir / img["file_name"]).read_bytes()  # not re-encoded
        h, w = img["height"], img["width"]
        kept = [a for a in doc["annotations"] if a["image_id"] == img["id"] and a["segmentation"]]
        assert len(record["annotations"]) == len(kept)
        for got, src in zip(record["annotations"], kept):
            assert got["category_id"] == src["category_id"]
            assert got["iscrowd"] == src["iscrowd"]
            assert got["bbox"] == pytest.approx(src["bbox"])  # COCO's own box, kept as is
            assert got["area"] == pytest.approx(src["area"])
            seg = src["segmentation"]
            if isinstance(seg, dict):
                expected = _expand_uncompressed(seg["counts"], h, w)
            else:
                expected = api.annToMask(src)
            np.testing.assert_array_equal(_decode(got["rle"], h, w), expected)
    if split == "val":
        polygon, crowd = records[0]["annotations"]
        # The 1x2 polygon square covers pixels x=0, y=0..1: written out by hand.
        square = np.zeros((10, 5), np.uint8)
        square[0:2, 0] = 1
        np.testing.assert_array_equal(_decode(polygon["rle"], 10, 5), square)
        columns = np.zeros((10, 5), np.uint8)
        columns[:, 0:2] = 1  # uncompressed RLE [0, 20, 30]: the first two columns
        np.testing.assert_array_equal(_decode(crowd["rle"], 10, 5), columns)
        assert (crowd["iscrowd"], crowd["area"]) == (1, 20.0)
        assert manifest["instance_counts"] == {"1": 1, "2": 0, "4": 0}
        assert manifest["crowd_counts"] == {"1": 0, "2": 1, "4": 0}
        assert manifest["skipped"] == []
    else:
        # Quirk: the one train annotation has an empty segmentation (box only). The image stays
        # (a valid negative); the annotation is reported with its id.
        assert records[0]["annotations"] == []
        assert manifest["skipped"] == [
            {
                "source": "instances_train.json: annotation 1 (image 5, a.jpg)",
                "reason": "empty segmentation (box-only annotation)",
                "kind": "annotation",
                "code": "no_segmentation",
            }
        ]


# ---- a small broken data set --------------------------------------------------------------


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


TRIANGLE = [1.0, 1.0, 6.0, 1.0, 1.0, 5.0]


def _make_broken(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    (images / "good.jpg").write_bytes(_jpeg(8, 6))
    (images / "empty.jpg").write_bytes(_jpeg(7, 5, seed=1))
    (images / "pic.png").write_bytes(_png(4, 3))
    big = _jpeg(64, 64, seed=2)
    (images / "truncated.jpg").write_bytes(big[: len(big) * 2 // 3])
    (images / "text.jpg").write_text("this is not a JPEG\n")
    (images / "wrong_size.jpg").write_bytes(_jpeg(5, 5))
    (images / "sub").mkdir()
    (images / "sub" / "nested.jpg").write_bytes(_jpeg(4, 4, seed=3))
    square = np.zeros((6, 8), np.uint8)
    square[2:4, 3:7] = 1
    square_rle = mask_utils.encode(np.asfortranarray(square))["counts"].decode()

    def img(i, name, w, h):
        return {"id": i, "file_name": name, "width": w, "height": h}

    def ann(i, image_id, seg, bbox, cat=1, iscrowd=0):
        return {
            "id": i,
            "image_id": image_id,
            "category_id": cat,
            "segmentation": seg,
            "bbox": bbox,
            "area": 10.0,
            "iscrowd": iscrowd,
        }

    doc = {
        "images": [
            img(1, "good.jpg", 8, 6),
            img(2, "empty.jpg", 7, 5),
            img(3, "truncated.jpg", 64, 64),
            img(4, "text.jpg", 8, 6),
            img(5, "missing.jpg", 8, 6),
            img(6, "wrong_size.jpg", 8, 6),
            img(7, "pic.png", 4, 3),
            img(8, "sub/nested.jpg", 4, 4),
            img(1, "duplicate.jpg", 8, 6),
            {"id": 9, "file_name": "no_size.jpg"},
        ],
        "annotations": [
            ann(10, 1, [TRIANGLE], [1, 1, 5, 4]),
            ann(11, 1, {"size": [6, 8], "counts": square_rle}, [3, 2, 4, 2], cat=3, iscrowd=1),
            ann(12, 1, [TRIANGLE], [1, 1, 5, 4], cat=99),
            ann(13, 1, [[1.0, 1.0, 5.0, 5.0]], [1, 1, 4, 4]),
            ann(14, 1, [TRIANGLE], [1, 1, 0, 4]),
            ann(15, 1, [TRIANGLE], [50, 50, 2, 2]),
            ann(16, 1, {"size": [5, 5], "counts": square_rle}, [3, 2, 4, 2]),
            ann(17, 1, {"size": [6, 8], "counts": [0, 5]}, [0, 0, 1, 5]),
            ann(18, 1, [[-9.0, -9.0, -8.0, -9.0, -8.0, -8.0]], [0, 0, 1, 1]),
            ann(19, 7, [[0.0, 0.0, 3.0, 0.0, 3.0, 2.0]], [0, 0, 3, 2], cat=3),
            ann(20, 3, [TRIANGLE], [1, 1, 5, 4]),
            ann(21, 999, [TRIANGLE], [1, 1, 5, 4]),
            ann(22, 1, [TRIANGLE], [-2, -1, 5, 4]),
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
    }
    ann_file = root / "annotations" / "instances_x.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps(doc))
    return ann_file, images


def _by_source(manifest: dict) -> dict[str, tuple[str, str]]:
    return {s["source"]: (s["kind"], s["code"]) for s in manifest["skipped"]}


def test_bad_input_is_reported_and_skipped(tmp_path):
    ann_file, images = _make_broken(tmp_path / "src")
    manifest = _convert(ann_file, images, tmp_path / "out", shard_size=3)
    skipped = _by_source(manifest)
    name = "instances_x.json"
    img = images
    assert skipped == {
        f"{name}: image duplicate.jpg": ("image", "bad_image_entry"),
        f"{name}: image no_size.jpg": ("image", "bad_image_entry"),
        f"{name}: annotation 21": ("annotation", "unknown_image"),
        str(img / "truncated.jpg"): ("image", "undecodable_image"),
        str(img / "text.jpg"): ("image", "undecodable_image"),
        str(img / "missing.jpg"): ("image", "missing_image"),
        str(img / "wrong_size.jpg"): ("image", "image_size_mismatch"),
        f"{name}: annotation 12 (image 1, good.jpg)": ("annotation", "unknown_category"),
        f"{name}: annotation 13 (image 1, good.jpg)": ("annotation", "polygon_too_few_points"),
        f"{name}: annotation 14 (image 1, good.jpg)": ("annotation", "zero_area_box"),
        f"{name}: annotation 15 (image 1, good.jpg)": ("annotation", "box_outside_image"),
        f"{name}: annotation 16 (image 1, good.jpg)": ("annotation", "rle_size_mismatch"),
        f"{name}: annotation 17 (image 1, good.jpg)": ("annotation", "bad_rle"),
        f"{name}: annotation 18 (image 1, good.jpg)": ("annotation", "empty_mask"),
    }
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert reasons[str(img / "wrong_size.jpg")] == "declared 8x6 (WxH), file is 5x5"
    assert reasons[f"{name}: annotation 12 (image 1, good.jpg)"] == "unknown category id 99"
    assert "2 points" in reasons[f"{name}: annotation 13 (image 1, good.jpg)"]
    t = manifest["totals"]
    assert (t["images"], t["records"], t["skipped_images"], t["skipped_annotations"]) == (
        8,
        4,
        6,
        8,
    )

    records = {r["file_name"]: r for r in list(iter_records(tmp_path / "out"))}
    assert sorted(records) == ["empty.jpg", "good.jpg", "pic.png", "sub/nested.jpg"]
    assert records["empty.jpg"]["annotations"] == []  # a valid negative
    assert records["pic.png"]["image"] == (images / "pic.png").read_bytes()
    good = records["good.jpg"]["annotations"]
    assert [(a["category_id"], a["iscrowd"]) for a in good] == [(1, 0), (3, 1), (1, 0)]
    api = COCO(str(ann_file))
    for got, ann_id in zip(good, (10, 11, 22)):
        np.testing.assert_array_equal(_decode(got["rle"], 6, 8), api.annToMask(api.anns[ann_id]))
    assert good[2]["bbox"] == [0.0, 0.0, 3.0, 3.0]  # partly outside: clipped to the image
    assert records["pic.png"]["annotations"][0]["category_id"] == 3


def test_strict_fails_naming_the_record_and_keeps_written_shards(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "d.jpg"):
        (images / name).write_bytes(_jpeg(4, 4))
    doc = {
        "images": [
            {"id": i, "file_name": n, "width": 4, "height": 4}
            for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "one"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(doc))
    out = tmp_path / "out"
    with pytest.raises(BadRecordError, match=r"c\.jpg: image file not found \[missing_image\]"):
        _convert(ann_file, images, out, shard_size=1, strict=True)
    shard0, shard1 = out / "shard-00000.parquet", out / "shard-00001.parquet"
    before = [os.stat(p).st_ino for p in (shard0, shard1)]
    assert not (out / MANIFEST_NAME).exists()
    manifest = _convert(ann_file, images, out, shard_size=1, resume=True)
    assert [os.stat(p).st_ino for p in (shard0, shard1)] == before
    assert manifest["totals"]["records"] == 3

    doc["annotations"] = [
        {"id": 7, "image_id": 0, "category_id": 5, "segmentation": [TRIANGLE], "bbox": [1, 1, 2, 2]}
    ]
    ann_file.write_text(json.dumps(doc))
    with pytest.raises(BadRecordError, match=r"annotation 7 \(image 0, a\.jpg\): unknown category"):
        _convert(ann_file, images, tmp_path / "out2", strict=True)


def test_process_pool_gives_the_same_shards(tmp_path):
    ann_file, images = _make_broken(tmp_path / "src")
    one = _convert(ann_file, images, tmp_path / "one", shard_size=2)
    two = _convert(ann_file, images, tmp_path / "two", shard_size=2, workers=2)
    assert len(two["shards"]) >= 2
    assert two["shards"] == one["shards"]
    assert two["skipped"] == one["skipped"]


def test_layout_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        plan_coco(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        plan_coco(tmp_path / "bad.json", tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="not a COCO instances file"):
        plan_coco(tmp_path / "list.json", tmp_path)
    with pytest.raises(DataError, match="image folder not found"):
        plan_coco(tmp_path / "list.json", tmp_path / "nope")


def test_rle_helpers_match_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.random((7, 9)) < 0.4).astype(np.uint8)
        counts = mask_utils.encode(np.asfortranarray(m))["counts"]
        runs = rle_string_counts(counts)
        assert runs is not None and sum(runs) == 63
        np.testing.assert_array_equal(_expand_uncompressed(runs, 7, 9), m)
    assert rle_string_counts(b"0d") is None  # ends inside a number
    with pytest.raises(RecordProblem, match="odd number"):
        segmentation_to_rle([[1.0, 2.0, 3.0, 4.0, 5.0]], 5, 5)
    with pytest.raises(RecordProblem, match="bad_rle|do not cover"):
        segmentation_to_rle({"size": [5, 5], "counts": "PPP"}, 5, 5)


def test_process_pool_strict_and_resume_after_kill(tmp_path):
    ann_file, images = _make_broken(tmp_path / "src")
    with pytest.raises(BadRecordError, match=r"instances_x\.json: image duplicate\.jpg"):
        _convert(ann_file, images, tmp_path / "strict", shard_size=2, workers=2, strict=True)

    out = tmp_path / "out"
    finished: list[int] = []

    def kill(k: int) -> None:
        finished.append(k)
        raise KeyboardInterrupt  # like Ctrl-C once the first shard is in

    with pytest.raises(KeyboardInterrupt):
        _convert(ann_file, images, out, shard_size=2, workers=2, on_shard_done=kill)
    assert not (out / MANIFEST_NAME).exists()
    kept = {p.name: os.stat(p).st_ino for p in out.glob("*.parquet")}
    assert (out / "_progress" / f"shard-{finished[0]:05d}.json").exists()  # its done marker
    assert kept  # shards finished before the interrupt stay
    manifest = _convert(ann_file, images, out, shard_size=2, workers=2, resume=True)
    assert {p: os.stat(out / p).st_ino for p in kept} == kept
    full = _convert(ann_file, images, tmp_path / "full", shard_size=2)
    assert manifest["shards"] == full["shards"] and manifest["skipped"] == full["skipped"]
