"""Cityscapes gtFine converter: fixture conformance (crowd-only samples), 16-bit ids, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.convert_cityscapes import THING_CLASSES, convert_cityscapes, plan_cityscapes
from pipeline.data.manifest import DataError, iter_records

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "datumaro"
CITY_ROOT = FIXTURES / "cityscapes_dataset" / "dataset"
THINGS = {24, 25, 26, 27, 28, 31, 32, 33}


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
    return convert_cityscapes(root, split, out, **kw)


def _expected(png: Path) -> list[tuple[int, int, np.ndarray]]:
    """(category, iscrowd, mask) per object or crowd region, straight from the source PNG."""
    ids = np.array(Image.open(png)).astype(np.int64)
    out = []
    for v in (int(v) for v in np.unique(ids)):
        if v >= 1000 and v // 1000 in THINGS:
            out.append((v // 1000, 0, (ids == v).astype(np.uint8)))
        elif v < 1000 and v in THINGS:
            out.append((v, 1, (ids == v).astype(np.uint8)))
    return out


@pytest.mark.parametrize(
    "split, crowd_classes",
    [("train", [[24]]), ("val", [[]]), ("test", [[27], [31]])],
)
def test_fixture_conformance(tmp_path, split, crowd_classes):
    manifest = _convert(CITY_ROOT, split, tmp_path / "out")
    assert [(c["id"], c["name"]) for c in manifest["categories"]] == [
        (24, "person"),
        (25, "rider"),
        (26, "car"),
        (27, "truck"),
        (28, "bus"),
        (31, "train"),
        (32, "motorcycle"),
        (33, "bicycle"),
    ]
    image_dir = CITY_ROOT / "leftImg8bit" / split
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    records = list(iter_records(tmp_path / "out"))
    assert [r["file_name"] for r in records] == [
        p.relative_to(image_dir).as_posix() for p in images
    ]
    for record, image in zip(records, images):
        assert record["image"] == image.read_bytes()
        h, w = record["height"], record["width"]
        gt = CITY_ROOT / "gtFine" / split / image.parent.name
        gt = gt / image.name.replace("_leftImg8bit.png", "_gtFine_instanceIds.png")
        expected = _expected(gt)
        assert len(record["annotations"]) == len(expected)
        for got, (category, iscrowd, m) in zip(record["annotations"], expected):
            assert (got["category_id"], got["iscrowd"]) == (category, iscrowd)
            np.testing.assert_array_equal(_decode(got["rle"], h, w), m)
            assert got["bbox"] == _box(m) and got["area"] == float(m.sum())
    # The samples hold only crowd regions (ids below 1000); val holds none (a valid negative).
    assert [[a["category_id"] for a in r["annotations"] if a["iscrowd"]] for r in records] == (
        crowd_classes
    )
    assert manifest["totals"]["instances"] == 0 and manifest["skipped"] == []


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (5, 6, 7)).save(buf, "PNG")
    return buf.getvalue()


def _frame(root: Path, name: str, ids: np.ndarray | Image.Image | None, size=(6, 4)) -> None:
    img = root / "leftImg8bit" / "train" / "aachen" / f"{name}_leftImg8bit.png"
    gt = root / "gtFine" / "train" / "aachen" / f"{name}_gtFine_instanceIds.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    gt.parent.mkdir(parents=True, exist_ok=True)
    img.write_bytes(_png(*size))
    if isinstance(ids, np.ndarray):
        Image.fromarray(ids.astype(np.uint16)).save(gt)
    elif ids is not None:
        ids.save(gt)


def test_16bit_instances_crowd_and_ignored_classes(tmp_path):
    ids = np.full((4, 6), 7, np.int64)  # road
    ids[0:2, 0:2] = 26001  # car 1
    ids[2:4, 0:2] = 26002  # car 2
    ids[0, 3:6] = 24  # person crowd region
    ids[3, 5] = 29001  # caravan: has instances but is not evaluated, so background
    ids[1, 4] = 33000  # bicycle instance with index 0
    _frame(tmp_path, "aachen_000000_000019", ids)
    manifest = _convert(tmp_path, "train", tmp_path / "out")
    (record,) = list(iter_records(tmp_path / "out"))
    got = [(a["category_id"], a["iscrowd"], a["area"], a["bbox"]) for a in record["annotations"]]
    assert got == [
        (24, 1, 3.0, [3.0, 0.0, 3.0, 1.0]),
        (26, 0, 4.0, [0.0, 0.0, 2.0, 2.0]),
        (26, 0, 4.0, [0.0, 2.0, 2.0, 2.0]),
        (33, 0, 1.0, [4.0, 1.0, 1.0, 1.0]),
    ]
    assert manifest["instance_counts"]["26"] == 2 and manifest["crowd_counts"]["24"] == 1


def test_bad_input_is_reported_and_skipped(tmp_path):
    ok = np.full((4, 6), 26001)
    _frame(tmp_path, "aachen_000000_000001", ok)
    _frame(tmp_path, "aachen_000000_000002", Image.new("RGB", (6, 4)))  # wrong mode
    _frame(tmp_path, "aachen_000000_000003", np.zeros((4, 5)))  # wrong size
    _frame(tmp_path, "aachen_000000_000004", None)  # no instance map
    bad = tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000005_leftImg8bit.png"
    _frame(tmp_path, "aachen_000000_000005", ok)
    bad.write_bytes(_png(6, 4)[:40])  # truncated PNG
    manifest = _convert(tmp_path, "train", tmp_path / "out", shard_size=2, workers=2)
    codes = {Path(s["source"]).name: s["code"] for s in manifest["skipped"]}
    assert codes == {
        "aachen_000000_000002_gtFine_instanceIds.png": "instance_png_mode",
        "aachen_000000_000003_gtFine_instanceIds.png": "instance_png_size",
        "aachen_000000_000004_leftImg8bit.png": "missing_instances",
        "aachen_000000_000005_leftImg8bit.png": "undecodable_image",
    }
    assert [r["image_id"] for r in list(iter_records(tmp_path / "out"))] == [0]


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="leftImg8bit/train: not found"):
        plan_cityscapes(tmp_path, "train")
    assert set(THING_CLASSES) == THINGS
