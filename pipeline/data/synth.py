"""The project's embedded default data set, written in a real COCO or MVD layout.

`write_synthetic` renders scenes of five shape classes (`synth_scenes`) and writes them in a real
COCO instances or Mapillary Vistas (v2.0) layout, so the converters run end to end on it exactly
as on the real data sets. The classes differ by shape and by hue range, so a tiny PANet learns
them on a CPU in minutes; empty images and (COCO only) crowd regions keep the annotation formats
honest.

Every scene is a pure function of `(seed, split, image index)`: the same call writes the same
bytes, and the COCO and MVD layouts of one seed hold the same pictures (except the COCO-only
crowd regions). Every annotation is read back from the scene's label map, so masks are exact
(see `synth_scenes`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pipeline.data.synth_scenes import SHAPE_CLASSES, STUFF_LABELS, Instance, Scene, scenes

SYNTH_VERSION = 1
FORMATS = ("coco", "mvd")
MVD_VERSION = "v2.0"

CROWD_PROBABILITY = 0.04  # COCO only: share of images with one `iscrowd` group
JPEG_QUALITY = 90
# Colours MVD's config shows the thing labels with (the images use the classes' hue ranges).
_THING_DISPLAY_COLORS = {
    "disc": (220, 60, 40),
    "rectangle": (230, 200, 40),
    "triangle": (40, 190, 70),
    "ring": (40, 90, 220),
    "star": (170, 50, 200),
}


def write_synthetic(
    fmt: str,
    n_images: int,
    seed: int,
    out: Path,
    *,
    split: str = "train",
    min_size: int = 160,
    max_size: int = 320,
) -> Path:
    """Render `n_images` synthetic scenes and write them as a COCO or MVD data set under `out`.

    Images are written one by one as they are rendered; only the COCO annotation list is
    held until the end.

    Args:
        fmt: "coco" (`images/<split>/<id:012d>.jpg`, `annotations/instances_<split>.json`) or
            "mvd" (`config_v2.0.json`, `<split>/images/<key>.jpg`,
            `<split>/v2.0/instances/<key>.png` (uint16 label_id * 256 + instance index) and
            `<split>/v2.0/labels/<key>.png` (uint8 label id)).
        n_images: number of images (>= 0).
        seed: non-negative seed; with `split`, it fixes every byte written.
        out: output root, created if missing.
        split: split name used in paths; different splits of one seed hold different scenes.
        min_size: smallest image side in px (>= 32).
        max_size: largest image side in px (>= min_size). Height and width are drawn apart.

    Returns:
        `out`.

    Raises:
        ValueError: a bad parameter, or `out` already holds the other format's layout.
    """
    _check_parameters(fmt, n_images, seed, split, min_size, max_size)
    out = Path(out)
    other = existing_layout(out)
    if other is not None and other != fmt:
        raise ValueError(
            f"out: {out} already holds a {other.upper()} data set; writing {fmt.upper()} there "
            "would mix two layouts: choose another --out, or remove that folder first"
        )
    out.mkdir(parents=True, exist_ok=True)
    crowd_probability = CROWD_PROBABILITY if fmt == "coco" else 0.0
    rendered = scenes(seed, split, n_images, min_size, max_size, crowd_probability)
    if fmt == "coco":
        _write_coco(rendered, out, split)
    else:
        _write_mvd(rendered, out, seed, split)
    _write_readme(out, fmt, n_images, seed, split, min_size, max_size)
    return out


def _check_parameters(
    fmt: str, n_images: int, seed: int, split: str, min_size: int, max_size: int
) -> None:
    """Raise a ValueError naming the first bad parameter of `write_synthetic`."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if n_images < 0:
        raise ValueError(f"n_images: expected >= 0, got {n_images}")
    if seed < 0:
        raise ValueError(f"seed: expected >= 0, got {seed}")
    if not 32 <= min_size <= max_size:
        raise ValueError(
            f"min_size/max_size: need 32 <= min_size <= max_size, got {min_size}/{max_size}"
        )
    if not split or "/" in split or "\\" in split:
        raise ValueError(f"split: expected a plain folder name, got {split!r}")


def existing_layout(root: Path) -> str | None:
    """ "coco" or "mvd" if `root` already holds that layout's files, else None."""
    root = Path(root)
    if not root.is_dir():
        return None
    if (root / "annotations").is_dir() or (root / "images").is_dir():
        return "coco"
    if any(root.glob("config*.json")) or any(root.glob("*/images")):
        return "mvd"
    return None


def mvd_key(seed: int, split: str, index: int) -> str:
    """The MVD image key of scene `index`: 22 URL-safe characters, like the real data set's.

    Args:
        seed: the data set seed.
        split: the split name.
        index: the scene's position in the split, from 0.

    Returns:
        The key (file stem of the image, instance and label files).
    """
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=18).digest()
    return base64.urlsafe_b64encode(digest).decode()[:22]


# ---------------------------------------------------------------------------------------------
# Writers


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    # 4:4:4 so that the colour edges of small shapes stay where the masks say they are.
    Image.fromarray(image).save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)


def _write_coco(rendered: Iterator[Scene], out: Path, split: str) -> None:
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    for index, scene in enumerate(rendered):
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(scene.image, image_dir / file_name)
        h, w = scene.owner.shape
        images.append(
            {"id": image_id, "file_name": file_name, "height": h, "width": w, "license": 0}
        )
        for k, inst in enumerate(scene.instances):
            annotations.append(_coco_annotation(scene, k, inst, image_id, len(annotations) + 1))
    doc = {
        "info": {
            "description": "PANet-on-Ray synthetic shapes",
            "version": str(SYNTH_VERSION),
            "year": "",
            "contributor": "pipeline.data.synth",
            "date_created": "",
            "url": "",
        },
        "licenses": [{"id": 0, "name": "CC0-1.0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CLASSES
        ],
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    _write_text(ann_dir / f"instances_{split}.json", json.dumps(doc, separators=(",", ":")))


def _coco_annotation(scene: Scene, k: int, inst: Instance, image_id: int, ann_id: int) -> dict:
    visible = scene.visible(k)
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    area = int(mask_utils.area(rle))
    segmentation: list[list[float]] | dict
    if inst.crowd:
        # COCO stores its crowd regions as uncompressed RLE.
        segmentation = {"size": list(visible.shape), "counts": _uncompressed_counts(visible)}
    elif inst.polygon is not None and area == inst.full_area:
        segmentation = [inst.polygon]
    else:
        # Occluded (often into pieces) or with a hole: no single polygon describes it.
        segmentation = {"size": list(visible.shape), "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": SHAPE_CLASSES[inst.class_index].category_id,
        "segmentation": segmentation,
        "area": float(area),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(inst.crowd),
    }


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: alternating run lengths of 0 and 1, column-major."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    # Runs start with zeros: a mask starting with a 1 gets an empty leading run.
    return [0, *counts] if flat[0] else counts


def _write_mvd(rendered: Iterator[Scene], out: Path, seed: int, split: str) -> None:
    image_dir = out / split / "images"
    instance_dir = out / split / MVD_VERSION / "instances"
    label_dir = out / split / MVD_VERSION / "labels"
    for d in (image_dir, instance_dir, label_dir):
        d.mkdir(parents=True, exist_ok=True)
    _write_text(out / f"config_{MVD_VERSION}.json", json.dumps(_mvd_config(), indent=2))
    for index, scene in enumerate(rendered):
        key = mvd_key(seed, split, index)
        labels = scene.stuff.copy()
        instances = scene.stuff.astype(np.uint16) * 256  # stuff: instance index 0
        next_index: dict[int, int] = {}
        for k, inst in enumerate(scene.instances):
            label_id = SHAPE_CLASSES[inst.class_index].category_id
            index_in_label = next_index.get(label_id, 0)
            next_index[label_id] = index_in_label + 1
            visible = scene.visible(k)
            labels[visible] = label_id
            instances[visible] = label_id * 256 + index_in_label
        _save_jpeg(scene.image, image_dir / f"{key}.jpg")
        Image.fromarray(instances).save(instance_dir / f"{key}.png")  # mode "I;16"
        Image.fromarray(labels).save(label_dir / f"{key}.png")


def _mvd_config() -> dict:
    labels: dict[int, dict] = {
        s.label_id: {
            "name": s.name,
            "readable": s.readable,
            "color": list(s.color),
            "instances": False,
            "evaluate": s.evaluate,
        }
        for s in STUFF_LABELS
    }
    for c in SHAPE_CLASSES:
        labels[c.category_id] = {
            "name": f"shape--{c.name}",
            "readable": c.name.capitalize(),
            "color": list(_THING_DISPLAY_COLORS[c.name]),
            "instances": True,
            "evaluate": True,
        }
    if sorted(labels) != list(range(len(labels))):
        raise AssertionError(f"MVD label ids must be 0..N-1 list positions, got {sorted(labels)}")
    return {
        "labels": [labels[i] for i in range(len(labels))],
        "version": MVD_VERSION.lstrip("v"),
        "mapping": "public",
        "folder_structure": "{split}/{content}/{key:.{22}}.{ext}",
    }


def _write_readme(
    out: Path, fmt: str, n_images: int, seed: int, split: str, min_size: int, max_size: int
) -> None:
    classes = ", ".join(f"{c.name} (id {c.category_id})" for c in SHAPE_CLASSES)
    text = (
        "PANet-on-Ray synthetic shapes data set\n"
        "======================================\n\n"
        "Coloured shapes on low-saturation textured backgrounds, rendered by\n"
        "pipeline.data.synth.write_synthetic: the project's embedded default data set.\n"
        "Nothing here is real imagery; licence CC0-1.0.\n\n"
        f"generator: pipeline.data.synth version {SYNTH_VERSION}\n"
        f"format: {fmt}\n"
        f"split: {split}\n"
        f"images: {n_images}\n"
        f"seed: {seed}\n"
        f"image sides: {min_size}..{max_size} px\n"
        f"classes: {classes}\n\n"
        "Each class has its own shape and hue range; instances occlude one another, and masks\n"
        "are exact (each pixel belongs to the one instance painted there). Same seed, split\n"
        "and version: the same bytes. COCO and MVD data sets of one seed hold the same\n"
        "pictures, except that some COCO images add an `iscrowd` group (MVD has no crowds).\n"
    )
    _write_text(out / "README.txt", text)


def _write_text(path: Path, text: str) -> None:
    # Write-then-rename: a crashed run never leaves a half-written annotation file behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
