"""Mapillary Vistas converter: v1.2/v2.0 fixture conformance, id-map encoding, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.convert_mvd import convert_mvd, id_map_rles, plan_mvd
from pipeline.data.manifest import DataError, iter_records
from pipeline.data.plan import BadRecordError

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "datumaro"
MVD_ROOT = FIXTURES / "mapillary_vistas_dataset"


def _decode(rle: str, h: int, w: int) -> np.ndarray:
    return mask_utils.decode({"size": [h, w], "counts": rle.encode()})


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min() + 1),
        float(ys.max() - ys.min() + 1),
    ]


def _convert(root: Path, split: str, out: Path, **kw) -> dict:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return convert_mvd(root, split, out, **kw)


def _expected(png: Path, thing_labels: set[int]) -> list[tuple[int, np.ndarray]]:
    """(category, mask) per instance, decoded straight from the source PNG."""
    ids = np.array(Image.open(png)).astype(np.int64)
    return [
        (int(v) // 256, (ids == v).astype(np.uint8))
        for v in np.unique(ids)
        if int(v) // 256 in thing_labels
    ]


@pytest.mark.parametrize("version", ["v1.2", "v2.0"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_fixture_conformance(tmp_path, version, split):
    manifest = _convert(MVD_ROOT, split, tmp_path / "out", version=version)
    config = json.loads((MVD_ROOT / f"config_{version}.json").read_text())
    things = {i for i, label in enumerate(config["labels"]) if label["instances"]}
    assert [(c["id"], c["name"], c["color"]) for c in manifest["categories"]] == [
        (i, label["name"], label["color"])
        for i, label in enumerate(config["labels"])
        if label["instances"]
    ]
    assert manifest["source"]["version"] == version and manifest["skipped"] == []
    images = sorted((MVD_ROOT / split / "images").iterdir())
    records = list(iter_records(tmp_path / "out"))
    assert [r["file_name"] for r in records] == [p.name for p in images]
    total = 0
    for record, image in zip(records, images):
        assert record["image"] == image.read_bytes()
        h, w = record["height"], record["width"]
        assert Image.open(image).size == (w, h)
        expected = _expected(MVD_ROOT / split / version / "instances" / f"{image.stem}.png", things)
        assert len(record["annotations"]) == len(expected)
        for got, (category, m) in zip(record["annotations"], expected):
            assert got["category_id"] == category and got["iscrowd"] == 0
            np.testing.assert_array_equal(_decode(got["rle"], h, w), m)
            assert got["bbox"] == _box(m)
            assert got["area"] == float(m.sum())
        total += len(expected)
    assert manifest["totals"]["instances"] == total


def test_value_zero_is_a_real_object():
    # Quirk from the fixture README: value 0 is label 0 ("animal--bird") instance 0.
    plan = plan_mvd(MVD_ROOT, "val", "v1.2")
    result = plan.convert_item(plan.items[0], plan.context)
    first = result.record["annotations"][0]
    assert first["category_id"] == 0
    assert first["bbox"] == [0.0, 0.0, 3.0, 5.0] and first["area"] == 15.0


def test_version_pick_and_layout_errors(tmp_path):
    assert plan_mvd(MVD_ROOT, "val").source["version"] == "v1.2"  # both present: v1.2
    assert plan_mvd(MVD_ROOT, "val", "v2.0").source["config"] == "config_v2.0.json"
    with pytest.raises(DataError, match="--version"):
        plan_mvd(MVD_ROOT, "val", "v3")
    with pytest.raises(DataError, match="no_such_split.*not found"):
        plan_mvd(MVD_ROOT, "no_such_split")
    with pytest.raises(DataError, match="config_v1.2.json: not found"):
        plan_mvd(tmp_path, "val")
    with pytest.raises(DataError, match="root not found"):
        plan_mvd(tmp_path / "nope", "val")
    (tmp_path / "config_v2.0.json").write_text('{"labels": 3}')
    with pytest.raises(DataError, match="not a Mapillary Vistas config"):
        plan_mvd(tmp_path, "val")


@pytest.mark.parametrize("seed", range(6))
def test_id_map_rles_equal_pycocotools_encode(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 12, size=2)
    ids = rng.integers(0, 4, size=(h, w)).astype(np.uint16) * 256 + rng.integers(0, 3, (h, w))
    if seed == 0:
        ids[:] = 7  # one id covering everything
    if seed == 1:
        ids[:] = 0
        ids[-1, -1] = 5  # only the last pixel
    got = id_map_rles(ids, keep=lambda v: True)
    assert [v for v, *_ in got] == sorted(int(v) for v in np.unique(ids))
    for value, rle, area, bbox in got:
        m = (ids == value).astype(np.uint8)
        assert rle == mask_utils.encode(np.asfortranarray(m))["counts"].decode()
        assert area == m.sum() and bbox == _box(m)


# ---- a small broken data set --------------------------------------------------------------


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 60, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _save_ids(path: Path, ids: np.ndarray) -> None:
    Image.fromarray(ids.astype(np.uint16)).save(path)  # mode I;16


def _make_broken(root: Path) -> None:
    labels = [
        {"name": "thing--a", "color": [1, 2, 3], "instances": True},
        {"name": "stuff--road", "color": [4, 5, 6], "instances": False},
        {"name": "thing--b", "color": [7, 8, 9], "instances": True},
    ]
    (root / "config_v2.0.json").parent.mkdir(parents=True)
    (root / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    images = root / "training" / "images"
    inst = root / "training" / "v2.0" / "instances"
    images.mkdir(parents=True)
    inst.mkdir(parents=True)
    ids = np.full((4, 6), 1 * 256, np.uint16)  # road everywhere...
    ids[1:3, 1:3] = 2 * 256 + 1  # ...one thing--b...
    ids[0, 5] = 0  # ...one thing--a pixel...
    ids[3, 0] = 200 * 256 + 3  # ...and a label the config does not have
    for name in ("a", "mode", "size", "noinst", "text"):
        (images / f"{name}.jpg").write_bytes(_jpeg(6, 4))
    _save_ids(inst / "a.png", ids)
    _save_ids(inst / "orphan.png", ids)  # no image
    Image.new("RGB", (6, 4)).save(inst / "mode.png")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(inst / "eight_bit.png")
    (images / "eight_bit.jpg").write_bytes(_jpeg(6, 4))
    _save_ids(inst / "size.png", np.zeros((3, 6)))
    (images / "text.jpg").write_text("not an image")
    _save_ids(inst / "text.png", ids)
    (images / "notes.txt").write_text("ignored: not an image suffix")


def test_bad_input_is_reported_and_skipped(tmp_path):
    root = tmp_path / "mvd"
    _make_broken(root)
    manifest = _convert(root, "training", tmp_path / "out", shard_size=2, workers=2)
    assert [c["id"] for c in manifest["categories"]] == [0, 2]  # road has no instances
    images, inst = root / "training" / "images", root / "training" / "v2.0" / "instances"
    skipped = {(s["source"], s["kind"], s["code"]) for s in manifest["skipped"]}
    assert skipped == {
        (f"{inst / 'a.png'}: instance value {200 * 256 + 3}", "annotation", "unknown_category"),
        (str(inst / "mode.png"), "image", "instance_png_mode"),
        (str(inst / "eight_bit.png"), "image", "instance_png_mode"),
        (str(inst / "size.png"), "image", "instance_png_size"),
        (str(images / "noinst.jpg"), "image", "missing_instances"),
        (str(inst / "orphan.png"), "image", "missing_image"),
        (str(images / "text.jpg"), "image", "undecodable_image"),
    }
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert reasons[str(inst / "size.png")] == "instance PNG is 6x3 (WxH), image is 6x4"
    assert "mode RGB" in reasons[str(inst / "mode.png")]
    (record,) = list(iter_records(tmp_path / "out"))
    assert record["file_name"] == "a.jpg"
    got = [(a["category_id"], a["area"], a["bbox"]) for a in record["annotations"]]
    assert got == [(0, 1.0, [5.0, 0.0, 1.0, 1.0]), (2, 4.0, [1.0, 1.0, 2.0, 2.0])]
    # Image ids are positions in the sorted key list, stable whatever was skipped.
    keys = sorted({"a", "mode", "size", "noinst", "text", "orphan", "eight_bit"})
    assert record["image_id"] == keys.index("a")

    with pytest.raises(BadRecordError, match=r"a\.png: instance value 51203: label id 200"):
        _convert(root, "training", tmp_path / "strict", strict=True)
