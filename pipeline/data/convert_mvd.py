"""Mapillary Vistas (v1.2 / v2.0) -> sharded records.

Layout (the v2.0 release; the v1.x release's flat `<split>/instances` and `config.json` are
accepted too):

    <root>/config_v1.2.json, config_v2.0.json     labels: name, color, "instances": bool
    <root>/<split>/images/<key>.jpg
    <root>/<split>/<version>/instances/<key>.png  16-bit: label id * 256 + instance index

Only labels with `"instances": true` become categories (37 in v1.2), with the label id (its
index in the config) as category id, so readers must map ids through the manifest: id 0 is a
real class here (v1.2's "animal--bird"), and pixel value 0 is label 0 instance 0, a real object.
Box and area come from the mask. The id-map encoder here is shared with Cityscapes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.data.image_limit import ImageTooLarge, open_image
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

VERSIONS = ("v1.2", "v2.0")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MVD_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16-bit ids: 8-bit PNGs cannot hold label * 256


def read_id_map(path: Path, expected_hw: tuple[int, int], modes: tuple[str, ...]) -> np.ndarray:
    """Read an instance-id PNG and check its mode and size against the image.

    Args:
        path: the PNG.
        expected_hw: the image's (height, width).
        modes: accepted PIL modes (integer greyscale).

    Returns:
        (H, W) integer array of ids.

    Raises:
        RecordProblem: missing, unreadable, not a PNG, wrong mode or wrong size.
    """
    try:
        with open_image(path) as im:  # header first: a bomb is refused before decoding
            im.load()
            fmt, mode = im.format, im.mode
            ids = np.array(im)
    except FileNotFoundError:
        raise RecordProblem("missing_instances", "instance PNG not found") from None
    except ImageTooLarge as e:
        raise RecordProblem("image_too_large", f"instance PNG: {e}") from None
    except Exception as e:
        raise RecordProblem("bad_instance_png", f"not a readable PNG ({e})") from None
    if fmt != "PNG":
        raise RecordProblem("bad_instance_png", f"instance file is {fmt}, not PNG")
    if mode not in modes:
        raise RecordProblem(
            "instance_png_mode", f"instance PNG has mode {mode}, expected one of {', '.join(modes)}"
        )
    if ids.shape != tuple(expected_hw):
        h, w = expected_hw
        raise RecordProblem(
            "instance_png_size",
            f"instance PNG is {ids.shape[1]}x{ids.shape[0]} (WxH), image is {w}x{h}",
        )
    if ids.dtype.byteorder == ">":
        ids = ids.astype(ids.dtype.newbyteorder("="))
    return ids


def read_image_and_id_map(
    image: Path | None, id_map: Path | None, modes: tuple[str, ...]
) -> tuple[bytes, np.ndarray]:
    """Read an image and its instance-id PNG (MVD instances, Cityscapes instanceIds) together.

    Args:
        image: the image, None if the data set has only the id map.
        id_map: the id PNG, None if the data set has only the image.
        modes: accepted PIL modes of the id PNG.

    Returns:
        (the image's original bytes, (H, W) id array at the image's size).

    Raises:
        RecordProblem: with `source` set to the file at fault (missing partner, undecodable
            image, id PNG of the wrong mode or size).
    """
    if image is None:
        raise RecordProblem("missing_image", "no image for this id map", str(id_map))
    if id_map is None:
        raise RecordProblem("missing_instances", "no instance id map for this image", str(image))
    try:
        data, h, w = read_image(image)
    except RecordProblem as p:
        raise RecordProblem(p.code, p.reason, str(image)) from None
    try:
        ids = read_id_map(id_map, (h, w), modes)
    except RecordProblem as p:
        raise RecordProblem(p.code, p.reason, str(id_map)) from None
    return data, ids


def id_map_rles(ids: np.ndarray, keep: Callable[[int], bool]) -> list[tuple[int, str, int, list]]:
    """Encode every id of an id map (one object per id) as compressed COCO RLE in one pass.

    One stable sort groups the pixels of each id in column-major order (COCO RLE's order);
    each id's runs then follow from where its sorted positions jump. Cost: one sort of the image
    plus the pixels of each kept id, instead of a full-image comparison and encode per id.

    Args:
        ids: (H, W) integer id map.
        keep: which ids to encode (called once per distinct id, in ascending order).

    Returns:
        [(id, rle counts string, area in pixels, bbox [x, y, w, h]), ...] by ascending id.
    """
    h, w = ids.shape
    flat = ids.ravel(order="F")  # (H, W) -> (H*W,) column-major, like COCO RLE
    order = np.argsort(flat, kind="stable")  # stable: each id's positions stay ascending
    values = flat[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    ends = np.r_[starts[1:], flat.size]
    out = []
    for s, e in zip(starts, ends):
        value = int(values[s])
        if not keep(value):
            continue
        pos = order[s:e]
        jumps = np.flatnonzero(np.diff(pos) != 1)
        run_start = np.r_[pos[0], pos[jumps + 1]]
        run_end = np.r_[pos[jumps], pos[-1]] + 1
        counts = np.empty(2 * run_start.size, dtype=np.int64)
        counts[0::2] = run_start - np.r_[0, run_end[:-1]]  # zeros before each run (may be 0)
        counts[1::2] = run_end - run_start
        tail = flat.size - int(run_end[-1])
        # pycocotools' encoder ends with the last run, without an empty trailing zero run.
        runs = counts.tolist() + ([tail] if tail else [])
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        out.append((value, rle["counts"].decode("ascii"), int(e - s), bbox))
    return out


def _pick_version(root: Path, version: str | None) -> str:
    if version is not None:
        if version not in VERSIONS:
            raise DataError(f"--version: expected one of {', '.join(VERSIONS)}, got {version!r}")
        return version
    present = [v for v in VERSIONS if (root / f"config_{v}.json").is_file()]
    # Both present (the v2.0 release): v1.2 is the PANet paper's label set (37 classes).
    return present[0] if present else "v1.2"


def _load_labels(root: Path, version: str) -> tuple[Path, list[dict]]:
    config = root / f"config_{version}.json"
    if not config.is_file() and (root / "config.json").is_file():
        config = root / "config.json"  # the v1.x release
    if not config.is_file():
        raise DataError(
            f"{root / f'config_{version}.json'}: not found; expected the Mapillary Vistas layout "
            f"<root>/config_{version}.json, <root>/<split>/images, <root>/<split>/{version}/instances"
        )
    try:
        labels = json.loads(config.read_text(encoding="utf-8"))["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, dict) for x in labels):
            raise ValueError("'labels' is not a list of objects")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{config}: not a Mapillary Vistas config ({e})") from None
    return config, labels


def plan_mvd(root: str | Path, split: str, version: str | None = None) -> ConversionPlan:
    """Plan one item per image key of `<root>/<split>` (union of images and instance PNGs).

    Args:
        root: data set root (holding the config files and split folders).
        split: split folder name, e.g. "training", "validation".
        version: "v1.2" or "v2.0"; None picks the one whose config exists (v1.2 if both).

    Returns:
        The plan for `write_shards`; image ids are positions in the sorted key list.

    Raises:
        DataError: missing root, config, split, images or instances folder; bad config.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: Mapillary Vistas root not found")
    version = _pick_version(root, version)
    config, labels = _load_labels(root, version)
    categories = _thing_categories(labels)
    images_dir, instances_dir = _split_folders(root, split, version)
    image_files = _files_by_key(images_dir, IMAGE_SUFFIXES)
    instance_files = _files_by_key(instances_dir, (".png",))
    keys = sorted(set(image_files) | set(instance_files))
    items = [(i, image_files.get(k), instance_files.get(k)) for i, k in enumerate(keys)]
    source = {
        "format": "mvd",
        "root": str(root.resolve()),
        "split": split,
        "version": version,
        "config": config.name,
    }
    thing_ids = frozenset(c["id"] for c in categories)
    return ConversionPlan(
        name="mvd",
        source=source,
        categories=categories,
        items=items,
        convert_item=convert_mvd_item,
        item_source=mvd_item_source,
        context={
            "images": str(images_dir),
            "instances": str(instances_dir),
            "n_labels": len(labels),
            "things": thing_ids,
        },
        fingerprint=fingerprint("mvd", source, labels, items),
    )


def _thing_categories(labels: list[dict]) -> list[dict]:
    """The manifest's categories: the labels with instances, their list position as id."""
    categories = []
    for i, label in enumerate(labels):
        if label.get("instances"):
            color = label.get("color")
            categories.append(
                {
                    "id": i,
                    "name": str(label.get("name", i)),
                    "color": list(color) if isinstance(color, list) else [0, 0, 0],
                    "readable": str(label.get("readable", "")),
                }
            )
    return categories


def _split_folders(root: Path, split: str, version: str) -> tuple[Path, Path]:
    """The split's images and instances folders.

    Raises:
        DataError: the split, or one of its folders, is missing.
    """
    if not (root / split).is_dir():
        found = sorted(d.name for d in root.iterdir() if (d / "images").is_dir())
        raise DataError(
            f"{root / split}: split {split!r} not found; the splits under {root} are "
            f"{', '.join(found) or 'none'} (--split names a folder <root>/<split>/images)"
        )
    images_dir = root / split / "images"
    instances_dir = root / split / version / "instances"
    if not instances_dir.is_dir() and (root / split / "instances").is_dir():
        instances_dir = root / split / "instances"  # the v1.x release
    for d in (root / split, images_dir, instances_dir):
        if not d.is_dir():
            raise DataError(
                f"{d}: not found; expected the Mapillary Vistas layout <root>/<split>/images and "
                f"<root>/<split>/{version}/instances"
            )
    return images_dir, instances_dir


def _files_by_key(folder: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    """Image key (file stem) -> file name, for the files of `folder` with one of `suffixes`."""
    return {
        p.stem: p.name
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in suffixes
    }


def mvd_item_source(item: tuple[int, str | None, str | None], context: dict) -> str:
    """The file an item stands for (the image, or its instance PNG if the image is missing)."""
    _, image_name, instance_name = item
    if image_name is not None:
        return str(Path(context["images"]) / image_name)
    return str(Path(context["instances"]) / str(instance_name))


def convert_mvd_item(item: tuple[int, str | None, str | None], context: dict) -> ItemResult:
    """Read one image and its instance PNG; one annotation per instance of a thing label.

    Args:
        item: (image id, image file name or None, instance PNG name or None).
        context: {"images", "instances": folders, "n_labels": labels in the config,
            "things": label ids with instances}.

    Returns:
        The record (None if the image, its PNG or their pairing is bad) and skipped entries.
    """
    image_id, image_name, instance_name = item
    images, instances = Path(context["images"]), Path(context["instances"])
    png = instances / instance_name if instance_name is not None else None
    try:
        data, ids = read_image_and_id_map(
            images / image_name if image_name is not None else None, png, MVD_MODES
        )
    except RecordProblem as p:
        return ItemResult(None, [skip_entry("image", str(p.source), p.code, p.reason)])
    h, w = ids.shape
    n_labels, things = context["n_labels"], context["things"]
    unknown: list[int] = []

    def keep(value: int) -> bool:
        label = value >> 8
        if not 0 <= label < n_labels:
            unknown.append(value)
            return False
        return label in things  # labels without instances (road, sky...) are background

    annotations = [
        {"category_id": value >> 8, "bbox": bbox, "area": float(area), "iscrowd": 0, "rle": rle}
        for value, rle, area, bbox in id_map_rles(ids, keep)
    ]
    skipped = [
        skip_entry(
            "annotation",
            f"{png}: instance value {v}",
            "unknown_category",
            f"label id {v >> 8} is not in the config ({n_labels} labels)",
        )
        for v in unknown
    ]
    record = {
        "image_id": image_id,
        "file_name": image_name,
        "height": h,
        "width": w,
        "image": data,
        "annotations": annotations,
    }
    return ItemResult(record, skipped)


def convert_mvd(
    root: str | Path, split: str, out: str | Path, *, version: str | None = None, **options: Any
) -> dict:
    """Convert one split of Mapillary Vistas to a shard directory.

    Args:
        root: data set root.
        split: split folder name.
        out: output shard directory.
        version: "v1.2" or "v2.0" (None: the one present, v1.2 if both).
        **options: `write_shards` keywords (shard_size, workers, strict, resume, progress, ...).

    Returns:
        The manifest.
    """
    return write_shards(plan_mvd(root, split, version), out, **options)
