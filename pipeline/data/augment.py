"""Per-record decode and augmentation, run inside Ray Data `map_batches` on CPU workers.

Everything here is a plain function of a record dict (one row of `records.RECORD_SCHEMA`), so
it is testable without Ray. Training rows go through multi-scale resize (the paper's MST) and
horizontal flip; masks stay compressed: each RLE is decoded, resized nearest, flipped and
re-encoded as compressed RLE, so only RLE strings cross the object store. Boxes are recomputed
from the transformed masks, which keeps them aligned with the image by construction.

A record that cannot be decoded (bad image bytes, bad RLE, wrong size, unknown category) does
not raise: it comes back as a row with `valid=False` and a `reason`, so the consumer can keep
its step count fixed (see `batches.iter_train_batches`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from pipeline.data.image_limit import ImageTooLarge, open_image

# What a training sample looks like on its way from `map_batches` to the train worker: the
# image as raw RGB bytes at the augmented size, masks as compressed RLE at that size.
TRAIN_SAMPLE_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("valid", pa.bool_()),  # False: corrupt record, kept as a placeholder row
        ("reason", pa.string()),  # why the record is invalid; "" when valid
        ("height", pa.int32()),  # augmented image height H
        ("width", pa.int32()),  # augmented image width W
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("flipped", pa.bool_()),
        ("image", pa.binary()),  # (H, W, 3) uint8 RGB, C order
        ("labels", pa.list_(pa.int64())),  # (N,) contiguous labels 1..C
        ("boxes", pa.list_(pa.float32())),  # (N * 4,) x1y1x2y2 at (H, W)
        ("rles", pa.list_(pa.string())),  # (N,) compressed RLE counts at (H, W)
        ("crowd_excluded", pa.int32()),  # crowd annotations left out of the targets
        ("degenerate_dropped", pa.int32()),  # instances whose mask became empty
    ]
)

# An evaluation sample: the decoded image at its original size, nothing else (COCO ground
# truth comes from the shards separately).
EVAL_SAMPLE_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("valid", pa.bool_()),
        ("reason", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),  # (H, W, 3) uint8 RGB, C order
    ]
)

# Characters per run value: pycocotools shifts a 32-bit int by 5 bits per character, so longer
# values (runs >= 2**29 pixels) cannot come from its encoder.
_MAX_RLE_GROUP = 6


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation: multi-scale training (MST) resize and horizontal flip.

    The default is the tiny CPU setting; `AugmentConfig.paper()` is the paper's MST.
    """

    scales: tuple[int, ...] = (192, 288)  # short sides to sample from, or (min, max) if range
    scale_range: bool = True  # True: sample the short side uniformly in [scales[0], scales[1]]
    max_size: int = 400  # cap on the long side after resize
    flip_prob: float = 0.5  # probability of a horizontal flip
    seed: int = 0  # base seed for scale, flip and file-order draws

    def __post_init__(self) -> None:
        if not self.scales or any(int(s) != s or s <= 0 for s in self.scales):
            raise ValueError(f"AugmentConfig.scales must be positive ints, got {self.scales!r}")
        if self.scale_range and (len(self.scales) != 2 or self.scales[0] > self.scales[1]):
            raise ValueError(
                f"AugmentConfig.scales must be (min, max) when scale_range=True, "
                f"got {self.scales!r}"
            )
        if self.max_size <= 0:
            raise ValueError(f"AugmentConfig.max_size must be positive, got {self.max_size}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"AugmentConfig.flip_prob must be in [0, 1], got {self.flip_prob}")

    @classmethod
    def paper(cls, seed: int = 0) -> AugmentConfig:
        """The paper's multi-scale training: short side in {1200..400}, long side <= 1400."""
        return cls(scales=(1200, 1000, 800, 600, 400), scale_range=False, max_size=1400, seed=seed)


class RecordError(ValueError):
    """A record that cannot be decoded; the message is the reason shown to the user."""


def record_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator for one record's draws.

    Seeding per record (not per batch or task) makes the augmentation independent of how Ray
    Data happens to cut blocks and batches, so a run is reproducible from its seed.

    Args:
        seed: base seed.
        epoch: effective epoch.
        image_id: the record's image id (any int64).

    Returns:
        A numpy Generator.
    """
    return np.random.default_rng([seed % 2**64, epoch % 2**64, image_id % 2**64])


def sample_size(
    height: int, width: int, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[int, int]:
    """Sample the MST training size: short side from `aug.scales`, long side capped.

    Args:
        height, width: original image size.
        aug: augmentation config.
        rng: draws exactly one number.

    Returns:
        (new_height, new_width), each >= 1.
    """
    if aug.scale_range:
        short = int(rng.integers(aug.scales[0], aug.scales[1] + 1))
    else:
        short = int(aug.scales[int(rng.integers(len(aug.scales)))])
    scale = short / min(height, width)
    if max(height, width) * scale > aug.max_size:
        scale = aug.max_size / max(height, width)
    # Round half up, as detectron2's ResizeShortestEdge does.
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Parse a compressed COCO RLE counts string exactly as pycocotools' `rleFrString` does.

    pycocotools trusts the string (runs that sum to less than h*w leave uninitialized memory
    in its decoded mask), so records are parsed here, vectorized, and checked before decoding.

    Args:
        counts: the compressed counts (ASCII characters 48..111).

    Returns:
        (M,) int64 run lengths, alternating background/foreground, starting with background.

    Raises:
        RecordError: on a malformed string.
    """
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if c.min() < 0 or c.max() > 63:
        raise RecordError("bad RLE: character out of range")
    more = (c & 0x20) != 0
    if more[-1]:
        raise RecordError("bad RLE: truncated counts string")
    ends = np.flatnonzero(~more)  # last character of each value
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_RLE_GROUP:
        raise RecordError("bad RLE: run length too large")
    # Each character carries 5 bits, least significant first; the bits are disjoint, so a sum
    # per group is the same as an OR.
    shift = 5 * (np.arange(c.size) - np.repeat(starts, lengths))
    x = np.add.reduceat((c & 0x1F) << shift, starts)
    # Bit 0x10 of the last character is the sign: x | (-1 << 5k) == x - 2**(5k) for x < 2**(5k).
    x = np.where((c[ends] & 0x10) != 0, x - (np.int64(1) << (5 * lengths)), x)
    # From the fourth value on, values are deltas to the run two places back.
    cnts = x.copy()
    cnts[1::2] = np.cumsum(x[1::2])
    if cnts.size > 2:
        cnts[2::2] = np.cumsum(x[2::2])
    return cnts


def checked_counts(counts: str | bytes, height: int, width: int) -> np.ndarray:
    """Run lengths of an RLE, checked to cover exactly height * width pixels.

    Returns:
        (M,) int64 run lengths, as `rle_counts`.

    Raises:
        RecordError: malformed string, negative run, or wrong pixel count.
    """
    cnts = rle_counts(counts)
    if cnts.size and cnts.min() < 0:
        raise RecordError("bad RLE: negative run")
    total = int(cnts.sum())
    if total != height * width:
        raise RecordError(f"bad RLE: runs cover {total} pixels, image has {height * width}")
    return cnts


def check_rle(counts: str | bytes, height: int, width: int) -> None:
    """Raise `RecordError` unless `counts` is a well-formed RLE of exactly height*width pixels."""
    checked_counts(counts, height, width)


def decode_rle_wh(counts: str | bytes, height: int, width: int) -> np.ndarray:
    """Decode one compressed RLE, checked, to a transposed mask.

    COCO runs go down columns, so the natural layout is (W, H) in C order (the transpose of
    the (H, W) mask): `np.repeat` writes it in one pass, about 10x faster than pycocotools'
    byte loop, and never reads or writes out of bounds.

    Returns:
        (W, H) uint8 in {0, 1}.

    Raises:
        RecordError: as `checked_counts`.
    """
    cnts = checked_counts(counts, height, width)
    values = (np.arange(cnts.size) & 1).astype(np.uint8)  # runs alternate 0, 1, 0, ...
    return np.repeat(values, cnts).reshape(width, height)  # (H * W,) -> (W, H)


def _open_image(data: bytes, height: int, width: int) -> Image.Image:
    """Open encoded bytes lazily and check the header size against the record."""
    if not data:
        raise RecordError("bad image: empty bytes")
    try:
        img = open_image(data)
    except ImageTooLarge as e:
        raise RecordError(f"bad image: {e}") from None
    except UnidentifiedImageError:
        raise RecordError("bad image: not a recognizable image format") from None
    except Exception as e:  # PIL raises several unrelated types for garbage input
        raise RecordError(f"bad image: {type(e).__name__}: {e}") from e
    if img.size != (width, height):
        raise RecordError(
            f"bad image: size {img.size[1]}x{img.size[0]}, record says {height}x{width}"
        )
    return img


def _load_rgb(img: Image.Image) -> Image.Image:
    try:
        return img.convert("RGB")  # forces the decode; truncated files fail here
    except Exception as e:
        raise RecordError(f"bad image: {type(e).__name__}: {e}") from e


def decode_resize_image(
    data: bytes, height: int, width: int, size: tuple[int, int], flip: bool
) -> np.ndarray:
    """Decode an encoded image, resize it bilinearly to `size` and optionally flip it.

    Args:
        data: encoded JPEG/PNG bytes of a (height, width) image.
        height, width: size the record claims.
        size: (new_height, new_width).
        flip: flip horizontally.

    Returns:
        (new_height, new_width, 3) uint8 RGB array.
    """
    img = _open_image(data, height, width)
    new_h, new_w = size
    if img.format == "JPEG" and (new_h * 2 <= height or new_w * 2 <= width):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the requested size): the
        # DCT scaling skips most of the decode work when the MST shrinks the image a lot.
        img.draft("RGB", (new_w, new_h))
    img = _load_rgb(img)
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode an encoded image at its original size.

    Returns:
        (height, width, 3) uint8 RGB array.
    """
    return np.asarray(_load_rgb(_open_image(data, height, width)))


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel for nearest resize, sampling pixel centers.

    PIL's bilinear resize maps pixel centers the same way ((i + 0.5) * src / dst), so masks
    resized with this index stay aligned with the image.
    """
    idx = ((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64)
    return np.minimum(idx, src - 1)


def transform_rles(
    rles: Sequence[str], height: int, width: int, size: tuple[int, int], flip: bool
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Resize (nearest) and flip compressed RLE masks, returning compressed RLEs.

    Args:
        rles: N compressed counts strings at (height, width).
        height, width: original size.
        size: (new_height, new_width).
        flip: flip horizontally.

    Returns:
        (rles, boxes, areas): N compressed counts at the new size, (N, 4) float32 boxes
        x1y1x2y2 from the mask extents, (N,) int64 mask areas at the new size.

    Raises:
        RecordError: a malformed RLE.
    """
    new_h, new_w = size
    rows, cols = _nearest_index(height, new_h), _nearest_index(width, new_w)
    if flip:
        cols = cols[::-1]
    # (n, new_w, new_h) C order is the transpose of the Fortran (new_h, new_w, n) array that
    # pycocotools encodes, so `.T` hands it over without a copy.
    small = np.empty((len(rles), new_w, new_h), np.uint8)
    for i, counts in enumerate(rles):
        # Gather sampled columns (also doing the flip), then sampled rows: (W, H) -> (w, h).
        small[i] = decode_rle_wh(counts, height, width).take(cols, axis=0).take(rows, axis=1)
    out = [r["counts"].decode("ascii") for r in mask_utils.encode(small.T)] if rles else []
    if not out:
        return [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    encoded = [{"size": [new_h, new_w], "counts": r} for r in out]
    xywh = mask_utils.toBbox(encoded).reshape(-1, 4)  # (N, 4) x, y, w, h
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    return out, boxes, mask_utils.area(encoded).astype(np.int64)


def _invalid_train_row(row: Mapping[str, Any], reason: str) -> dict[str, Any]:
    return {
        "image_id": int(row.get("image_id") or 0),
        "file_name": str(row.get("file_name") or ""),
        "valid": False,
        "reason": reason,
        "height": 0,
        "width": 0,
        "orig_height": int(row.get("height") or 0),
        "orig_width": int(row.get("width") or 0),
        "flipped": False,
        "image": b"",
        "labels": [],
        "boxes": [],
        "rles": [],
        "crowd_excluded": 0,
        "degenerate_dropped": 0,
    }


def _train_labels(
    anns: Sequence[Mapping[str, Any]], label_map: Mapping[int, int] | None
) -> list[int]:
    """The training label of each annotation (its category id if `label_map` is None).

    Raises:
        RecordError: a category the manifest does not list.
    """
    labels = []
    for a in anns:
        cat = int(a["category_id"])
        if label_map is not None and cat not in label_map:
            raise RecordError(f"bad record: category_id {cat} not in the manifest")
        labels.append(label_map[cat] if label_map is not None else cat)
    return labels


def augment_record(
    row: Mapping[str, Any],
    aug: AugmentConfig,
    rng: np.random.Generator,
    label_map: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Decode and augment one training record.

    Crowd annotations are left out of the targets (torchvision has no ignore regions) and
    counted; instances whose mask is empty after the resize are dropped and counted. A record
    that cannot be decoded comes back with `valid=False` and the reason, never an exception.

    Args:
        row: one record (`records.RECORD_SCHEMA` as a dict).
        aug: augmentation config.
        rng: draws the size first, then the flip, so the draws do not depend on the data.
        label_map: dataset category id -> contiguous label; None keeps category ids.

    Returns:
        One row of `TRAIN_SAMPLE_SCHEMA` as a dict.
    """
    try:
        height, width = int(row["height"]), int(row["width"])
        if height <= 0 or width <= 0:
            raise RecordError(f"bad record: size {height}x{width}")
        size = sample_size(height, width, aug, rng)
        flip = bool(rng.random() < aug.flip_prob)

        anns = row.get("annotations") or []
        kept = [a for a in anns if not a["iscrowd"]]
        labels = _train_labels(kept, label_map)
        image = decode_resize_image(row["image"], height, width, size, flip)
        rles, boxes, areas = transform_rles([a["rle"] for a in kept], height, width, size, flip)
    except RecordError as e:
        return _invalid_train_row(row, str(e))
    except Exception as e:  # a long job must outlive any single record
        return _invalid_train_row(row, f"unexpected {type(e).__name__}: {e}")

    keep = areas > 0
    return {
        "image_id": int(row["image_id"]),
        "file_name": str(row["file_name"]),
        "valid": True,
        "reason": "",
        "height": size[0],
        "width": size[1],
        "orig_height": height,
        "orig_width": width,
        "flipped": flip,
        "image": image.tobytes(),
        "labels": [lab for lab, k in zip(labels, keep) if k],
        "boxes": boxes[keep].reshape(-1).tolist(),  # (N, 4) -> (N * 4,)
        "rles": [r for r, k in zip(rles, keep) if k],
        "crowd_excluded": len(anns) - len(kept),
        "degenerate_dropped": int((~keep).sum()),
    }


def decode_eval_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """Decode one evaluation record at its original size (no resize, no flip).

    Args:
        row: one record (`records.RECORD_SCHEMA` as a dict).

    Returns:
        One row of `EVAL_SAMPLE_SCHEMA` as a dict; `valid=False` with a reason on failure.
    """
    height, width = int(row.get("height") or 0), int(row.get("width") or 0)
    try:
        image = decode_image(row["image"], height, width).tobytes()
        valid, reason = True, ""
    except Exception as e:
        image, valid = b"", False
        reason = str(e) if isinstance(e, RecordError) else f"unexpected {type(e).__name__}: {e}"
    return {
        "image_id": int(row.get("image_id") or 0),
        "file_name": str(row.get("file_name") or ""),
        "valid": valid,
        "reason": reason,
        "height": height,
        "width": width,
        "image": image,
    }


def augment_table(
    table: pa.Table,
    aug: AugmentConfig,
    seed: int,
    epoch: int,
    label_map: Mapping[int, int] | None = None,
) -> pa.Table:
    """`augment_record` over a pyarrow batch of records, one generator per record.

    Args:
        table: rows of `records.RECORD_SCHEMA` (extra columns are ignored).
        aug, label_map: as in `augment_record`.
        seed, epoch: seed the per-record generators (`record_rng`).

    Returns:
        A table of `TRAIN_SAMPLE_SCHEMA`, same number of rows and order.
    """
    rows = [
        augment_record(r, aug, record_rng(seed, epoch, int(r["image_id"] or 0)), label_map)
        for r in table.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=TRAIN_SAMPLE_SCHEMA)


def decode_eval_table(table: pa.Table) -> pa.Table:
    """`decode_eval_record` over a pyarrow batch of records.

    Returns:
        A table of `EVAL_SAMPLE_SCHEMA`, same number of rows and order.
    """
    rows = [decode_eval_record(r) for r in table.to_pylist()]
    return pa.Table.from_pylist(rows, schema=EVAL_SAMPLE_SCHEMA)
