"""COCO instances (`annotations/instances_<split>.json` + an image folder) -> sharded records.

The JSON index is loaded once (it is the only thing that is); images are read, checked and
copied one at a time in the workers. Polygons and uncompressed RLE are turned into compressed
RLE here, so readers only ever see one mask encoding. Box and area are COCO's own (the values
its evaluation uses); a box reaching outside the image is clipped to it.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
from pathlib import Path
from typing import Any, TypeGuard

from pycocotools import mask as mask_utils

from pipeline.data.manifest import DataError
from pipeline.data.plan import (
    ConversionPlan,
    ItemResult,
    RecordProblem,
    fingerprint,
    read_image,
    skip_entry,
)
from pipeline.data.writer import write_shards


def category_color(index: int) -> list[int]:
    """A distinct, deterministic display colour for the index-th category (COCO has none).

    Returns:
        [r, g, b] in 0..255.
    """
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours apart
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return [round(r * 255), round(g * 255), round(b * 255)]


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plan_coco(annotations: str | Path, images: str | Path) -> ConversionPlan:
    """Read a COCO instances file and plan one item per image, in the file's image order.

    Args:
        annotations: `instances_<split>.json`.
        images: folder the images' `file_name`s are relative to.

    Returns:
        The plan for `write_shards`. Image entries that cannot be used (bad id/size/name,
        duplicate id) and annotations of unknown images are in `pre_skipped`.

    Raises:
        DataError: missing file/folder, not JSON, not a COCO instances file.
    """
    ann_path = Path(annotations)
    image_root = Path(images)
    if not ann_path.is_file():
        raise DataError(f"{ann_path}: annotation file not found")
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image folder not found")
    raw = ann_path.read_bytes()
    doc = _instances_document(ann_path, raw)
    categories = _categories(ann_path, doc["categories"])
    name = ann_path.name
    entries, by_image, pre_skipped = _images_and_annotations(name, doc)
    # Only the fields a record needs travel to the workers.
    items = [
        (
            {k: img[k] for k in ("id", "file_name", "height", "width")},
            by_image.get(img["id"], []),
        )
        for img in entries
    ]
    info = doc["info"] if isinstance(doc.get("info"), dict) else {}
    source = {
        "format": "coco",
        "annotations": str(ann_path.resolve()),
        "images": str(image_root.resolve()),
        "description": info.get("description", ""),
    }
    category_ids = frozenset(c["id"] for c in categories)
    return ConversionPlan(
        name="coco",
        source=source,
        categories=categories,
        items=items,
        convert_item=convert_coco_item,
        item_source=coco_item_source,
        context={"images": str(image_root), "ann_file": name, "category_ids": category_ids},
        fingerprint=fingerprint("coco", hashlib.sha256(raw).hexdigest(), source["images"]),
        pre_skipped=pre_skipped,
    )


def _instances_document(ann_path: Path, raw: bytes) -> dict:
    """The parsed instances file, checked to hold 'images', 'categories' and 'annotations' lists.

    Raises:
        DataError: naming the file, if it is not JSON or not a COCO instances file.
    """
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{ann_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{ann_path}: not a COCO instances file (no 'images' list)")
    if not isinstance(doc.get("categories"), list) or not doc["categories"]:
        raise DataError(f"{ann_path}: not a COCO instances file (no 'categories' list)")
    doc.setdefault("annotations", [])  # image-info files (test-dev) have no annotations
    if not isinstance(doc["annotations"], list):
        raise DataError(f"{ann_path}: 'annotations' is not a list")
    return doc


def _categories(ann_path: Path, entries: list) -> list[dict]:
    """`[{"id", "name", "color"}, ...]` in the file's order.

    Raises:
        DataError: naming the file and the category, if one has no integer id or name, or an
            id appears twice.
    """
    categories = []
    seen: set[int] = set()
    for i, c in enumerate(entries):
        if (
            not isinstance(c, dict)
            or not _is_int(c.get("id"))
            or not isinstance(c.get("name"), str)
        ):
            raise DataError(f"{ann_path}: category #{i} needs an integer 'id' and a 'name': {c!r}")
        if c["id"] in seen:
            raise DataError(f"{ann_path}: category id {c['id']} appears twice")
        seen.add(c["id"])
        categories.append({"id": c["id"], "name": c["name"], "color": category_color(i)})
    return categories


def _images_and_annotations(
    name: str, doc: dict
) -> tuple[list[dict], dict[int, list[dict]], list[dict]]:
    """The usable image entries, their annotations by image id, and the skipped entries.

    Args:
        name: the annotation file's name, for the skipped entries' `source`.
        doc: the instances document.

    Returns:
        (image entries in file order, {image id: annotations}, skip entries: bad or duplicate
        image entries and annotations of unknown images).
    """
    pre_skipped: list[dict] = []
    entries: list[dict] = []
    ids: set[int] = set()
    for i, img in enumerate(doc["images"]):
        problem = _image_entry_problem(img)
        if problem is None and img["id"] in ids:
            problem = f"duplicate image id {img['id']} (first one kept)"
        if problem is not None:
            label = img.get("file_name", f"#{i}") if isinstance(img, dict) else f"#{i}"
            pre_skipped.append(
                skip_entry("image", f"{name}: image {label}", "bad_image_entry", problem)
            )
            continue
        ids.add(img["id"])
        entries.append(img)
    by_image: dict[int, list[dict]] = {}
    for ann in doc["annotations"]:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in ids:
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            pre_skipped.append(
                skip_entry(
                    "annotation",
                    f"{name}: annotation {ann_id}",
                    "unknown_image",
                    f"image id {image_id!r} is not in 'images'",
                )
            )
            continue
        by_image.setdefault(image_id, []).append(ann)
    return entries, by_image, pre_skipped


def _image_entry_problem(img: Any) -> str | None:
    if not isinstance(img, dict):
        return "image entry is not an object"
    if not _is_int(img.get("id")):
        return f"image id {img.get('id')!r} is not an integer"
    fn = img.get("file_name")
    if not isinstance(fn, str) or not fn or fn.startswith("/") or ".." in Path(fn).parts:
        return f"file_name {fn!r} is not a relative path"
    h, w = img.get("height"), img.get("width")
    if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
        return f"height/width {h!r}/{w!r} are not positive integers"
    return None


def coco_item_source(item: tuple[dict, list], context: dict) -> str:
    """The image file an item stands for (used in error reports).

    Returns:
        `<images>/<file_name>`.
    """
    return str(Path(context["images"]) / item[0]["file_name"])


def convert_coco_item(item: tuple[dict, list], context: dict) -> ItemResult:
    """Read and check one image, convert its annotations; bad ones are skipped and reported.

    Args:
        item: (image entry with id, file_name, height, width; its annotation dicts).
        context: {"images": root, "ann_file": name for reports, "category_ids": known ids}.

    Returns:
        The record (None if the image itself is bad) and the skipped entries.
    """
    img, anns = item
    path = Path(context["images"]) / img["file_name"]
    h, w = img["height"], img["width"]
    try:
        data, _, _ = read_image(path, expected_hw=(h, w))
    except RecordProblem as p:
        return ItemResult(None, [skip_entry("image", str(path), p.code, p.reason)])
    out, skipped = [], []
    for ann in anns:
        try:
            out.append(coco_annotation(ann, h, w, context["category_ids"]))
        except RecordProblem as p:
            source = (
                f"{context['ann_file']}: annotation {ann.get('id')} "
                f"(image {img['id']}, {img['file_name']})"
            )
            skipped.append(skip_entry("annotation", source, p.code, p.reason))
    record = {
        "image_id": img["id"],
        "file_name": img["file_name"],
        "height": h,
        "width": w,
        "image": data,
        "annotations": out,
    }
    return ItemResult(record, skipped)


def coco_annotation(ann: dict, h: int, w: int, category_ids: frozenset[int] | set[int]) -> dict:
    """One COCO annotation -> one record annotation (compressed RLE at the image size).

    Args:
        ann: the COCO annotation dict.
        h, w: image height and width.
        category_ids: ids of the file's categories.

    Returns:
        `{"category_id", "bbox", "area", "iscrowd", "rle"}`.

    Raises:
        RecordProblem: unknown category, bad iscrowd, bad/zero-area/outside box, missing or bad
            segmentation (polygon with < 3 points, RLE of another size), empty mask.
    """
    cid = ann.get("category_id")
    if not _is_int(cid) or cid not in category_ids:
        raise RecordProblem("unknown_category", f"unknown category id {cid!r}")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or isinstance(iscrowd, float):
        raise RecordProblem("bad_iscrowd", f"iscrowd {iscrowd!r} is not 0 or 1")
    box = _checked_box(ann.get("bbox"), h, w)
    rle = segmentation_to_rle(ann.get("segmentation"), h, w)
    mask_area = float(mask_utils.area(rle))
    if mask_area == 0:
        raise RecordProblem("empty_mask", "segmentation covers no pixel of the image")
    if box is None:
        box = [float(v) for v in mask_utils.toBbox(rle)]
    declared = ann.get("area")
    # COCO's declared area is what its evaluation bins objects by (small/medium/large).
    area = float(declared) if _is_number(declared) and declared > 0 else mask_area
    return {
        "category_id": cid,
        "bbox": box,
        "area": area,
        "iscrowd": int(iscrowd),
        "rle": rle["counts"].decode("ascii"),
    }


def _checked_box(bbox: Any, h: int, w: int) -> list[float] | None:
    if bbox is None:
        return None  # derived from the mask
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise RecordProblem("bad_box", f"bbox {bbox!r} is not 4 finite numbers")
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
        raise RecordProblem("zero_area_box", f"bbox {bbox} has zero area")
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if x1 <= x0 or y1 <= y0:
        raise RecordProblem("box_outside_image", f"bbox {bbox} lies outside the {w}x{h} image")
    return [x0, y0, x1 - x0, y1 - y0]


def segmentation_to_rle(seg: Any, h: int, w: int) -> dict:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE.

    Args:
        seg: the annotation's `segmentation`.
        h, w: image height and width.

    Returns:
        pycocotools RLE `{"size": [h, w], "counts": bytes}`.

    Raises:
        RecordProblem: missing/empty segmentation, polygon with < 3 points or odd or non-finite
            coordinates, RLE whose size is not the image's or whose runs do not cover it.
    """
    if isinstance(seg, list):
        if not seg:
            raise RecordProblem("no_segmentation", "empty segmentation (box-only annotation)")
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                raise RecordProblem("bad_polygon", "polygon is not a list of finite numbers")
            if len(poly) % 2:
                raise RecordProblem(
                    "bad_polygon", f"polygon has an odd number ({len(poly)}) of coordinates"
                )
            if len(poly) < 6:
                # Also guards pycocotools, which reads a 4-number "polygon" as a box.
                raise RecordProblem(
                    "polygon_too_few_points", f"polygon with {len(poly) // 2} points (needs >= 3)"
                )
            polys.append([float(v) for v in poly])
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    if isinstance(seg, dict):
        size = seg.get("size")
        counts = seg.get("counts")
        if not isinstance(size, list) or [int(v) if _is_number(v) else v for v in size] != [h, w]:
            raise RecordProblem("rle_size_mismatch", f"RLE size {size!r}, image is [{h}, {w}]")
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise RecordProblem("bad_rle", f"uncompressed RLE runs do not cover {h}x{w} pixels")
            return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        if isinstance(counts, (str, bytes)):
            raw = counts.encode("ascii") if isinstance(counts, str) else counts
            # pycocotools decodes without bounds checks: a bad string must never reach it.
            runs = rle_string_counts(raw)
            if runs is None or any(c < 0 for c in runs) or sum(runs) != h * w:
                raise RecordProblem("bad_rle", f"compressed RLE runs do not cover {h}x{w} pixels")
            return {"size": [h, w], "counts": raw}
        raise RecordProblem("bad_rle", f"RLE counts of type {type(counts).__name__}")
    if seg is None:
        raise RecordProblem("no_segmentation", "annotation has no segmentation")
    raise RecordProblem("bad_segmentation", f"segmentation of type {type(seg).__name__}")


def rle_string_counts(s: bytes) -> list[int] | None:
    """Decode COCO's compressed RLE string into run lengths (pycocotools' `rleFrString`).

    Args:
        s: the `counts` bytes.

    Returns:
        Run lengths, or None if the string is malformed (ends inside a number, bad characters).
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = s[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def convert_coco(
    annotations: str | Path, images: str | Path, out: str | Path, **options: Any
) -> dict:
    """Convert a COCO instances data set to a shard directory.

    Args:
        annotations: `instances_<split>.json`.
        images: folder holding the images named in the file.
        out: output shard directory.
        **options: `write_shards` keywords (shard_size, workers, strict, resume, progress, ...).

    Returns:
        The manifest.
    """
    return write_shards(plan_coco(annotations, images), out, **options)
