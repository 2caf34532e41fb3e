"""Pure-function tests of decode + augmentation (no Ray): alignment, counters, corrupt records."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.augment import (
    EVAL_SAMPLE_SCHEMA,
    TRAIN_SAMPLE_SCHEMA,
    AugmentConfig,
    RecordError,
    augment_record,
    augment_table,
    check_rle,
    decode_eval_record,
    record_rng,
    rle_counts,
    sample_size,
)
from pipeline.data.records import RECORD_SCHEMA

RED = (230, 20, 20)
BLUE = (20, 20, 230)


def encode_mask(mask: np.ndarray) -> str:
    """(H, W) {0,1} -> compressed RLE counts string."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def make_record(
    image_id: int,
    height: int = 60,
    width: int = 80,
    boxes: list[tuple[int, int, int, int, int, int]] = (),
    fmt: str = "PNG",
) -> dict:
    """A record with solid rectangles (x0, y0, x1, y1, category_id, iscrowd) on gray.

    Each rectangle is painted in the image with a distinct color and is its own mask, so
    image and mask alignment can be checked after any transform.
    """
    pixels = np.full((height, width, 3), 128, np.uint8)
    anns = []
    for k, (x0, y0, x1, y1, cat, crowd) in enumerate(boxes):
        pixels[y0:y1, x0:x1] = RED if k % 2 == 0 else BLUE
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 1
        anns.append(
            {
                "category_id": cat,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(mask.sum()),
                "iscrowd": crowd,
                "rle": encode_mask(mask),
            }
        )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return {
        "image_id": image_id,
        "file_name": f"img_{image_id}.{fmt.lower()}",
        "height": height,
        "width": width,
        "image": buf.getvalue(),
        "annotations": anns,
    }


def sample_image(row: dict) -> np.ndarray:
    return np.frombuffer(row["image"], np.uint8).reshape(row["height"], row["width"], 3)


def sample_masks(row: dict) -> np.ndarray:
    """(N, H, W) uint8 masks of a sample row."""
    if not row["rles"]:
        return np.zeros((0, row["height"], row["width"]), np.uint8)
    rles = [{"size": [row["height"], row["width"]], "counts": r} for r in row["rles"]]
    return mask_utils.decode(rles).transpose(2, 0, 1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


# ---------------------------------------------------------------------------------------------
# RLE parsing


def runs_of(mask: np.ndarray) -> np.ndarray:
    """Reference run lengths of a (H, W) mask in COCO's column-major order, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds)
    return np.concatenate([[0], runs]) if flat[0] == 1 else runs


def test_rle_counts_matches_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    for shape, p in [((7, 5), 0.5), ((64, 48), 0.02), ((64, 48), 0.98), ((300, 200), 0.5)]:
        mask = (rng.random(shape) < p).astype(np.uint8)
        mask[0, 0] = 1  # a leading zero-length background run
        counts = encode_mask(mask)
        np.testing.assert_array_equal(rle_counts(counts), runs_of(mask))
        check_rle(counts, *shape)
    big = np.zeros((700, 900), np.uint8)
    big[100:650, 5:880] = 1  # runs large enough to need multi-character values
    np.testing.assert_array_equal(rle_counts(encode_mask(big)), runs_of(big))


@pytest.mark.parametrize(
    "counts",
    [
        "",  # no runs at all: pycocotools would hand back uninitialized memory
        "P1",  # runs cover fewer pixels than the image
        "P137000V15",  # runs cover more pixels than the image
        "P13700`",  # last value has its continuation bit set
        "P1 37",  # character below '0'
        "P1\x7f7",  # character above 'o'
        "oooooooo0",  # a value longer than pycocotools' decoder can shift
    ],
)
def test_check_rle_rejects_malformed(counts):
    with pytest.raises(RecordError, match="bad RLE"):
        check_rle(counts, 10, 10)


# ---------------------------------------------------------------------------------------------
# Size sampling


def test_sample_size_range_within_bounds_and_long_side_capped():
    aug = AugmentConfig(scales=(192, 288), scale_range=True, max_size=400)
    rng = np.random.default_rng(1)
    shorts = set()
    for h, w in [(480, 640), (640, 480), (100, 1000), (300, 300), (50, 60)]:
        for _ in range(200):
            nh, nw = sample_size(h, w, aug, rng)
            assert max(nh, nw) <= 400
            assert abs(nh / nw - h / w) < 0.02 * h / w + 1 / min(nh, nw)  # aspect kept
            if max(h, w) / min(h, w) * 288 <= 400:
                assert 192 <= min(nh, nw) <= 288  # never capped at this aspect ratio
                shorts.add(min(nh, nw))
    assert min(shorts) == 192 and max(shorts) == 288  # both ends of the range are reachable
    # Very elongated: the long side cap wins.
    assert max(sample_size(100, 1000, aug, rng)) == 400


def test_sample_size_choice_is_one_of_the_scales():
    aug = AugmentConfig.paper()
    rng = np.random.default_rng(2)
    seen = {min(sample_size(480, 640, aug, rng)) for _ in range(300)}
    # 640/480 * 1200 = 1600 > 1400: the two largest scales are capped to 1050 on the short side.
    assert seen == {400, 600, 800, 1000, 1050}
    assert all(max(sample_size(480, 640, aug, rng)) <= 1400 for _ in range(50))


def test_augment_config_validation():
    with pytest.raises(ValueError, match="scales"):
        AugmentConfig(scales=(300, 200), scale_range=True)
    with pytest.raises(ValueError, match="scales"):
        AugmentConfig(scales=(200, 300, 400), scale_range=True)
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="max_size"):
        AugmentConfig(max_size=0)
    assert AugmentConfig.paper().scales == (1200, 1000, 800, 600, 400)


# ---------------------------------------------------------------------------------------------
# Alignment of image and masks


def test_resize_and_flip_keep_masks_aligned_with_image():
    # Image 60x80 with a red rectangle at rows 10..29, cols 20..49; shrink by 2 and flip.
    row = make_record(1, 60, 80, [(20, 10, 50, 30, 1, 0)])
    aug = AugmentConfig(scales=(30, 30), scale_range=True, max_size=1000, flip_prob=1.0)
    out = augment_record(row, aug, np.random.default_rng(0))
    assert out["valid"] and out["flipped"]
    assert (out["height"], out["width"]) == (30, 40)
    (mask,) = sample_masks(out)
    img = sample_image(out)
    red = (img[..., 0] > 150) & (img[..., 2] < 100)
    assert iou(red, mask.astype(bool)) > 0.8
    # Nearest resize samples source pixel 2i + 1: rows 5..14, cols 10..24 before the flip,
    # 40 - 25 .. 40 - 10 after it.
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 14, 15, 29)
    np.testing.assert_allclose(out["boxes"], [15, 5, 30, 15])
    assert out["labels"] == [1]


def test_jpeg_draft_downscale_keeps_alignment():
    # 400x600 JPEG shrunk 4x goes through PIL's draft (DCT-scaled) decode.
    row = make_record(2, 400, 600, [(100, 80, 300, 240, 1, 0), (400, 200, 560, 380, 2, 0)], "JPEG")
    aug = AugmentConfig(scales=(100, 100), scale_range=True, max_size=1000, flip_prob=0.0)
    out = augment_record(row, aug, np.random.default_rng(0))
    assert out["valid"] and (out["height"], out["width"]) == (100, 150)
    img = sample_image(out)
    red = (img[..., 0] > 150) & (img[..., 2] < 100)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    masks = sample_masks(out).astype(bool)
    assert iou(red, masks[0]) > 0.9 and iou(blue, masks[1]) > 0.9
    np.testing.assert_allclose(
        np.reshape(out["boxes"], (-1, 4)), [[25, 20, 75, 60], [100, 50, 140, 95]]
    )


def test_upscale_and_unflipped_boxes_match_masks():
    row = make_record(3, 30, 40, [(4, 6, 20, 16, 1, 0)])
    aug = AugmentConfig(scales=(90, 90), scale_range=True, max_size=1000, flip_prob=0.0)
    out = augment_record(row, aug, np.random.default_rng(0))
    assert (out["height"], out["width"]) == (90, 120)
    (mask,) = sample_masks(out)
    ys, xs = np.nonzero(mask)
    np.testing.assert_allclose(out["boxes"], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    np.testing.assert_allclose(out["boxes"], [12, 18, 60, 48])


# ---------------------------------------------------------------------------------------------
# Counters: crowd, degenerate; labels


def test_crowd_excluded_degenerate_dropped_and_labels_mapped():
    boxes = [
        (10, 10, 40, 40, 7, 0),  # kept, category 7 -> label 2
        (0, 0, 80, 60, 3, 1),  # crowd: excluded
        (1, 1, 2, 2, 3, 0),  # one pixel: vanishes when shrunk 4x
        (50, 20, 70, 50, 3, 0),  # kept, category 3 -> label 1
    ]
    row = make_record(4, 60, 80, boxes)
    aug = AugmentConfig(scales=(15, 15), scale_range=True, max_size=1000, flip_prob=0.0)
    out = augment_record(row, aug, np.random.default_rng(0), label_map={3: 1, 7: 2})
    assert out["valid"]
    assert out["crowd_excluded"] == 1
    assert out["degenerate_dropped"] == 1
    assert out["labels"] == [2, 1]
    assert len(out["rles"]) == 2 and len(out["boxes"]) == 8
    boxes_out = np.reshape(out["boxes"], (-1, 4))
    assert (boxes_out[:, 2:] > boxes_out[:, :2]).all()


def test_image_without_instances_is_a_valid_sample():
    out = augment_record(make_record(5), AugmentConfig(), np.random.default_rng(0))
    assert out["valid"] and out["labels"] == [] and out["rles"] == [] and out["boxes"] == []


def test_unknown_category_marks_record_invalid():
    row = make_record(6, boxes=[(1, 1, 20, 20, 99, 0)])
    out = augment_record(row, AugmentConfig(), np.random.default_rng(0), label_map={1: 1})
    assert not out["valid"] and "99" in out["reason"]


# ---------------------------------------------------------------------------------------------
# Corrupt records


def corrupt_variants() -> dict[str, dict]:
    good = make_record(10, boxes=[(5, 5, 30, 30, 1, 0)], fmt="JPEG")
    truncated = dict(good, image=good["image"][: len(good["image"]) // 2])
    garbage = dict(good, image=b"\x00not an image at all")
    empty = dict(good, image=b"")
    bad_rle = dict(good, annotations=[dict(good["annotations"][0], rle="P1")])
    wrong_size = dict(good, height=61)
    return {
        "truncated": truncated,
        "garbage": garbage,
        "empty": empty,
        "bad_rle": bad_rle,
        "wrong_size": wrong_size,
    }


@pytest.mark.parametrize("kind", list(corrupt_variants()))
def test_corrupt_records_are_marked_invalid_not_raised(kind):
    row = corrupt_variants()[kind]
    out = augment_record(row, AugmentConfig(), np.random.default_rng(0))
    assert out["valid"] is False
    assert out["reason"].startswith(("bad image", "bad RLE", "bad record"))
    assert out["image_id"] == 10 and out["file_name"] == "img_10.jpeg"
    pa.Table.from_pylist([out], schema=TRAIN_SAMPLE_SCHEMA)  # fits the schema


def test_augment_table_keeps_rows_and_order_with_corrupt_ones():
    variants = corrupt_variants()
    rows = [
        make_record(1, boxes=[(5, 5, 30, 30, 1, 0)]),
        dict(variants["garbage"], image_id=2),
        make_record(3),
        dict(variants["bad_rle"], image_id=4),
    ]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    out = augment_table(table, AugmentConfig(), seed=0, epoch=0, label_map={1: 1})
    assert out.schema == TRAIN_SAMPLE_SCHEMA
    assert out["image_id"].to_pylist() == [1, 2, 3, 4]
    assert out["valid"].to_pylist() == [True, False, True, False]


# ---------------------------------------------------------------------------------------------
# Determinism


def test_augmentation_is_deterministic_by_seed_and_varies_by_epoch():
    rows = [make_record(i, 48, 64, [(5, 5, 30, 30, 1, 0)]) for i in range(12)]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    aug = AugmentConfig(scales=(20, 40), max_size=100)

    def draws(seed, epoch, t=table):
        out = augment_table(t, aug, seed=seed, epoch=epoch)
        return list(
            zip(out["image_id"].to_pylist(), out["height"].to_pylist(), out["flipped"].to_pylist())
        )

    assert draws(1, 0) == draws(1, 0)
    assert draws(1, 0) != draws(1, 1)
    assert draws(1, 0) != draws(2, 0)
    # Independent of how rows are batched or ordered: per-record generators.
    reversed_draws = draws(1, 0, table.take(list(range(11, -1, -1))))
    assert sorted(reversed_draws) == sorted(draws(1, 0))
    assert record_rng(1, 0, 5).random() == record_rng(1, 0, 5).random()
    assert record_rng(1, 0, -5).random() != record_rng(1, 0, 5).random()


# ---------------------------------------------------------------------------------------------
# Eval decode


def test_decode_eval_record_original_size_and_corrupt():
    row = make_record(7, 50, 70, [(5, 5, 30, 30, 1, 0)], fmt="JPEG")
    out = decode_eval_record(row)
    assert out["valid"] and (out["height"], out["width"]) == (50, 70)
    assert len(out["image"]) == 50 * 70 * 3
    bad = decode_eval_record(dict(row, image=b"junk"))
    assert not bad["valid"] and bad["reason"].startswith("bad image")
    pa.Table.from_pylist([out, bad], schema=EVAL_SAMPLE_SCHEMA)


def test_grayscale_image_becomes_rgb():
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50), 200, np.uint8), mode="L").save(buf, format="JPEG")
    row = dict(make_record(8, 40, 50), image=buf.getvalue())
    out = augment_record(
        row, AugmentConfig(scales=(20, 20), max_size=100), np.random.default_rng(0)
    )
    assert out["valid"] and len(out["image"]) == out["height"] * out["width"] * 3
