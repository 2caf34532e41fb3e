"""Cityscapes gtFine -> sharded records.

Layout:

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png

In `instanceIds`, a thing pixel of an individual object holds class id * 1000 + index; a pixel
holding a thing class id below 1000 belongs to that class's crowd region (iscrowd=1, one region
per class and image). The 8 evaluated thing classes become categories with their Cityscapes
label ids; everything else (stuff, and caravan/trailer which the benchmark ignores) is
background. Box and area come from the mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.convert_mvd import id_map_rles, read_image_and_id_map
from pipeline.data.manifest import DataError
from pipeline.data.plan import (
    ConversionPlan,
    ItemResult,
    RecordProblem,
    fingerprint,
    skip_entry,
)
from pipeline.data.writer import write_shards

# Cityscapes label id -> (name, colour) of the 8 classes of the instance-level benchmark.
THING_CLASSES: dict[int, tuple[str, tuple[int, int, int]]] = {
    24: ("person", (220, 20, 60)),
    25: ("rider", (255, 0, 0)),
    26: ("car", (0, 0, 142)),
    27: ("truck", (0, 0, 70)),
    28: ("bus", (0, 60, 100)),
    31: ("train", (0, 80, 100)),
    32: ("motorcycle", (0, 0, 230)),
    33: ("bicycle", (119, 11, 32)),
}
# Real instanceIds are 16/32-bit; an 8-bit PNG can only hold crowd ids (< 256) but is valid.
CITYSCAPES_MODES = ("I", "I;16", "I;16B", "I;16L", "L")
IMAGE_SUFFIX = "_leftImg8bit.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def _index(folder: Path, suffix: str) -> dict[str, str]:
    # key "<city>/<city>_<seq>_<frame>" -> path relative to the split folder
    out = {}
    for p in sorted(folder.glob(f"*/*{suffix}")):
        rel = p.relative_to(folder).as_posix()
        out[rel[: -len(suffix)]] = rel
    return out


def plan_cityscapes(root: str | Path, split: str) -> ConversionPlan:
    """Plan one item per frame of `split` (union of leftImg8bit images and gtFine instance maps).

    Args:
        root: data set root holding `leftImg8bit/` and `gtFine/`.
        split: "train", "val" or "test".

    Returns:
        The plan for `write_shards`; image ids are positions in the sorted frame list.

    Raises:
        DataError: missing root or split folders.
    """
    root = Path(root)
    images_dir = root / "leftImg8bit" / split
    gt_dir = root / "gtFine" / split
    for d in (root, images_dir, gt_dir):
        if not d.is_dir():
            raise DataError(
                f"{d}: not found; expected the Cityscapes layout <root>/leftImg8bit/<split>/<city> "
                "and <root>/gtFine/<split>/<city>"
            )
    images = _index(images_dir, IMAGE_SUFFIX)
    gts = _index(gt_dir, INSTANCE_SUFFIX)
    keys = sorted(set(images) | set(gts))
    items = [(i, images.get(k), gts.get(k)) for i, k in enumerate(keys)]
    categories = [
        {"id": cid, "name": name, "color": list(color)}
        for cid, (name, color) in THING_CLASSES.items()
    ]
    source = {"format": "cityscapes", "root": str(root.resolve()), "split": split}
    return ConversionPlan(
        name="cityscapes",
        source=source,
        categories=categories,
        items=items,
        convert_item=convert_cityscapes_item,
        item_source=cityscapes_item_source,
        context={"images": str(images_dir), "gt": str(gt_dir)},
        fingerprint=fingerprint("cityscapes", source, items),
    )


def cityscapes_item_source(item: tuple[int, str | None, str | None], context: dict) -> str:
    """The file an item stands for (the image, or its instance map if the image is missing)."""
    _, image_rel, gt_rel = item
    if image_rel is not None:
        return str(Path(context["images"]) / image_rel)
    return str(Path(context["gt"]) / str(gt_rel))


def _keep(value: int) -> bool:
    if value >= 1000:
        return value // 1000 in THING_CLASSES
    return value in THING_CLASSES  # a bare class id: that class's crowd region


def convert_cityscapes_item(item: tuple[int, str | None, str | None], context: dict) -> ItemResult:
    """Read one frame and its instanceIds map; one annotation per object or crowd region.

    Args:
        item: (image id, image path relative to leftImg8bit/<split> or None, instanceIds path
            relative to gtFine/<split> or None).
        context: {"images", "gt": the two split folders}.

    Returns:
        The record (None if the image, its map or their pairing is bad) and skipped entries.
    """
    image_id, image_rel, gt_rel = item
    images, gt = Path(context["images"]), Path(context["gt"])
    try:
        data, ids = read_image_and_id_map(
            images / image_rel if image_rel is not None else None,
            gt / gt_rel if gt_rel is not None else None,
            CITYSCAPES_MODES,
        )
    except RecordProblem as p:
        return ItemResult(None, [skip_entry("image", str(p.source), p.code, p.reason)])
    h, w = ids.shape
    annotations = [
        {
            "category_id": value // 1000 if value >= 1000 else value,
            "bbox": bbox,
            "area": float(area),
            "iscrowd": 0 if value >= 1000 else 1,
            "rle": rle,
        }
        for value, rle, area, bbox in id_map_rles(ids, _keep)
    ]
    record = {
        "image_id": image_id,
        "file_name": image_rel,
        "height": h,
        "width": w,
        "image": data,
        "annotations": annotations,
    }
    return ItemResult(record, [])


def convert_cityscapes(root: str | Path, split: str, out: str | Path, **options: Any) -> dict:
    """Convert one split of Cityscapes gtFine to a shard directory.

    Args:
        root: data set root holding `leftImg8bit/` and `gtFine/`.
        split: "train", "val" or "test".
        out: output shard directory.
        **options: `write_shards` keywords (shard_size, workers, strict, resume, progress, ...).

    Returns:
        The manifest.
    """
    return write_shards(plan_cityscapes(root, split), out, **options)
