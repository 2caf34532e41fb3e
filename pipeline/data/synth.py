"""The project's embedded default data set: coloured shapes on textured backgrounds.

`write_synthetic` renders scenes of five shape classes and writes them in a real COCO instances
or Mapillary Vistas (v2.0) layout, so the converters run end to end on it exactly as on the
real data sets. The classes differ by shape and by hue range, so a tiny PANet learns them on a
CPU in minutes; occlusion, rings with holes, sizes from tiny to large, textured backgrounds,
empty images and (COCO only) crowd regions keep the task and the annotation formats honest.

Every scene is a pure function of `(seed, split, image index)`: the same call writes the same
bytes, and the COCO and MVD layouts of one seed hold the same pictures (except the COCO-only
crowd regions). Masks are exact by construction: each pixel of the picture is painted by the
one instance (or background region) that owns it in a label map, and every annotation is read
back from that map. Unoccluded polygon shapes are rasterised with pycocotools' own polygon
fill, so `COCO.annToMask` gives back exactly the painted pixels.
"""

from __future__ import annotations

import base64
import colorsys
import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

SYNTH_VERSION = 1
FORMATS = ("coco", "mvd")
MVD_VERSION = "v2.0"

MIN_VISIBLE_PX = 16  # an instance showing fewer pixels than this is unlearnable noise
MIN_VISIBLE_FRACTION = 0.3  # ... and so is one hidden by more than 70 % of its shape
EMPTY_FRACTION = 0.07  # share of images drawn without any instance (negatives)
MAX_INSTANCES = 6
CROWD_PROBABILITY = 0.04  # COCO only: share of images with one `iscrowd` group
PLACEMENT_TRIES = 8  # attempts to place one instance without hiding an earlier one too much
MIN_SIDE = 12  # smallest shape diameter in px: COCO "small" objects must exist
MAX_SIDE_FRACTION = 0.9  # largest shape diameter, as a fraction of the shorter image side
SIZE_POWER = 0.6  # < 1 tilts the log-uniform diameter towards large: about 37/55/8 % S/M/L
HUE_JITTER = 0.035  # half-width of a class's hue range (hue in [0, 1))
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ShapeClass:
    """One thing class of the synthetic data set."""

    name: str  # COCO category name; the MVD label is "shape--<name>"
    category_id: int  # COCO category id and MVD label id (not contiguous, on purpose)
    hue: float  # centre of the class's hue range, in [0, 1)
    min_side: int  # smallest diameter in px at which the shape is still recognisable


@dataclass(frozen=True)
class StuffLabel:
    """One MVD label without instances: the background regions."""

    label_id: int  # index in the MVD config's label list
    name: str
    readable: str
    color: tuple[int, int, int]
    evaluate: bool


SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("disc", 1, 0.02, MIN_SIDE),  # red-orange ellipses
    ShapeClass("rectangle", 2, 0.15, MIN_SIDE),  # yellow
    ShapeClass("triangle", 3, 0.36, 14),  # green
    ShapeClass("ring", 5, 0.60, 20),  # blue annuli: the hole must stay visible
    ShapeClass("star", 7, 0.83, 16),  # purple five-pointed stars
)

# Stuff labels fill the gaps between the thing ids, so that MVD label ids equal COCO category
# ids and a converter that assumed "things first" or "contiguous ids" fails visibly.
ROAD = StuffLabel(0, "construction--flat--road", "Road", (128, 64, 128), True)
WALL = StuffLabel(4, "construction--structure--wall", "Wall", (102, 102, 156), True)
SKY = StuffLabel(6, "nature--sky", "Sky", (70, 130, 180), True)
UNLABELED = StuffLabel(8, "void--unlabeled", "Unlabeled", (0, 0, 0), False)  # MVD's last label
STUFF_LABELS: tuple[StuffLabel, ...] = (ROAD, WALL, SKY, UNLABELED)

# Colours MVD's config shows the thing labels with (the images use the hue ranges above).
_THING_DISPLAY_COLORS = {
    "disc": (220, 60, 40),
    "rectangle": (230, 200, 40),
    "triangle": (40, 190, 70),
    "ring": (40, 90, 220),
    "star": (170, 50, 200),
}


@dataclass
class _Instance:
    class_index: int  # index into SHAPE_CLASSES
    full: np.ndarray  # (H, W) bool: the whole shape, before later shapes cover it
    full_area: int
    polygon: list[float] | None  # the shape as one COCO polygon; None for rings and crowds
    crowd: bool


@dataclass
class _Scene:
    image: np.ndarray  # (H, W, 3) uint8
    stuff: np.ndarray  # (H, W) uint8 MVD stuff label id of the background at each pixel
    owner: np.ndarray  # (H, W) int16 index into `instances` of the visible one, -1: background
    instances: list[_Instance]

    def visible(self, k: int) -> np.ndarray:
        """(H, W) bool: the pixels that show instance `k`."""
        return self.owner == k


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
    out = Path(out)
    other = existing_layout(out)
    if other is not None and other != fmt:
        raise ValueError(
            f"out: {out} already holds a {other.upper()} data set; writing {fmt.upper()} there "
            "would mix two layouts: choose another --out, or remove that folder first"
        )
    out.mkdir(parents=True, exist_ok=True)
    scenes = _scenes(seed, split, n_images, min_size, max_size, coco=fmt == "coco")
    if fmt == "coco":
        _write_coco(scenes, out, split)
    else:
        _write_mvd(scenes, out, seed, split)
    _write_readme(out, fmt, n_images, seed, split, min_size, max_size)
    return out


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


def _scenes(
    seed: int, split: str, n_images: int, min_size: int, max_size: int, *, coco: bool
) -> Iterator[_Scene]:
    # crc32, not hash(): Python salts str hashes per process.
    split_code = zlib.crc32(split.encode())
    crowd_probability = CROWD_PROBABILITY if coco else 0.0
    for index in range(n_images):
        # One stream per scene: scene i does not depend on how many were drawn before it.
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
        yield _render_scene(rng, min_size, max_size, crowd_probability)


# ---------------------------------------------------------------------------------------------
# Rendering


def _render_scene(
    rng: np.random.Generator, min_size: int, max_size: int, crowd_probability: float
) -> _Scene:
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    background, stuff = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int16)
    instances: list[_Instance] = []
    visible_area: list[int] = []

    # Drawn whatever the probability, so that scenes without a crowd are the same in both
    # formats.
    if rng.random() < crowd_probability:
        _place(owner, instances, visible_area, _sample_crowd(rng, h, w))
    n = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_INSTANCES + 1))
    for _ in range(n):
        for _ in range(PLACEMENT_TRIES):
            if _place(owner, instances, visible_area, _sample_instance(rng, h, w)):
                break

    image = background  # painted in place
    for k, inst in enumerate(instances):
        ys, xs = np.nonzero(inst.full)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        texture = _instance_texture(rng, SHAPE_CLASSES[inst.class_index], y1 - y0, x1 - x0)
        sel = owner[y0:y1, x0:x1] == k
        image[y0:y1, x0:x1][sel] = texture[sel]
    image8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _Scene(image=image8, stuff=stuff, owner=owner, instances=instances)


def _place(
    owner: np.ndarray, instances: list[_Instance], visible_area: list[int], candidate: _Instance
) -> bool:
    """Draw `candidate` on top unless it would hide too much of an earlier instance.

    Rejecting the newcomer (rather than dropping the victim) keeps every painted instance
    annotated: no pixel ever shows an unannotated shape.
    """
    if candidate.full_area < MIN_VISIBLE_PX:
        return False
    covered = np.bincount(owner[candidate.full] + 1, minlength=len(instances) + 1)[1:]
    for j, lost in enumerate(covered):
        left = visible_area[j] - int(lost)
        if lost and left < max(MIN_VISIBLE_PX, MIN_VISIBLE_FRACTION * instances[j].full_area):
            return False
    for j, lost in enumerate(covered):
        visible_area[j] -= int(lost)
    owner[candidate.full] = len(instances)
    instances.append(candidate)
    visible_area.append(candidate.full_area)
    return True


def _sample_instance(rng: np.random.Generator, h: int, w: int) -> _Instance:
    class_index = int(rng.integers(len(SHAPE_CLASSES)))
    cls = SHAPE_CLASSES[class_index]
    lo = float(cls.min_side)
    hi = max(lo, MAX_SIDE_FRACTION * min(h, w))
    # Near log-uniform, so every COCO size range is populated; a plain log-uniform leaves too
    # few large objects, as thin shapes (stars, rings) cover a small part of their diameter.
    side = math.exp(math.log(lo) + rng.uniform() ** SIZE_POWER * math.log(hi / lo))
    outer, hole = _shape(rng, cls.name, side)
    outer, hole = _fit_and_move(rng, outer, hole, h, w, center=None, spread=0.0)
    full = _rasterize(outer, hole, h, w)
    polygon = outer.ravel().tolist() if hole is None else None
    return _Instance(class_index, full, int(full.sum()), polygon=polygon, crowd=False)


def _sample_crowd(rng: np.random.Generator, h: int, w: int) -> _Instance:
    """A tight cluster of small same-class shapes, annotated once with `iscrowd: 1`."""
    class_index = int(rng.integers(len(SHAPE_CLASSES)))
    cls = SHAPE_CLASSES[class_index]
    spread = rng.uniform(0.08, 0.18) * min(h, w)
    center = (rng.uniform(spread, w - spread), rng.uniform(spread, h - spread))
    full = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(6, 14))):
        outer, hole = _shape(rng, cls.name, rng.uniform(cls.min_side, 1.5 * cls.min_side))
        outer, hole = _fit_and_move(rng, outer, hole, h, w, center=center, spread=spread)
        full |= _rasterize(outer, hole, h, w)
    return _Instance(class_index, full, int(full.sum()), polygon=None, crowd=True)


def _shape(
    rng: np.random.Generator, name: str, side: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """A shape of diameter `side` around the origin, randomly rotated and stretched.

    Returns:
        (N, 2) outer polygon (x, y) and, for rings, the (M, 2) polygon of the hole.
    """
    r = side / 2.0
    hole = None
    if name == "disc":
        pts = _ellipse(r, r * rng.uniform(0.5, 1.0))
    elif name == "rectangle":
        aspect = rng.uniform(0.35, 1.0)
        # Half extents scaled so that the diagonal, not the long side, equals `side`.
        hx, hy = r / math.hypot(1.0, aspect), r * aspect / math.hypot(1.0, aspect)
        pts = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    elif name == "triangle":
        angles = np.deg2rad(90.0 + 120.0 * np.arange(3) + rng.uniform(-15.0, 15.0, size=3))
        radii = r * rng.uniform(0.85, 1.0, size=3)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        pts[:, 1] *= rng.uniform(0.65, 1.0)
    elif name == "ring":
        ry = r * rng.uniform(0.75, 1.0)
        pts = _ellipse(r, ry)
        inner = rng.uniform(0.45, 0.65)
        hole = _ellipse(r * inner, ry * inner)
    elif name == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown shape {name!r}")
    theta = rng.uniform(0.0, 2.0 * np.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return pts @ rot.T, (None if hole is None else hole @ rot.T)


def _ellipse(rx: float, ry: float) -> np.ndarray:
    # Vertex count grows with the perimeter so that large ellipses stay round.
    n = int(np.clip(2.0 * np.pi * max(rx, ry) / 3.0, 12, 64))
    t = np.arange(n) * (2.0 * np.pi / n)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _fit_and_move(
    rng: np.random.Generator,
    outer: np.ndarray,
    hole: np.ndarray | None,
    h: int,
    w: int,
    *,
    center: tuple[float, float] | None,
    spread: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Translate a shape to a random place fully inside the image (no border truncation).

    Shapes too large for the image are shrunk to fit. With `center`, the shape lands within
    `spread` px of it (crowd members). Coordinates are rounded to 0.01 px here, because the
    rounded polygon is both what is rasterised and what the JSON stores.
    """
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    extent = hi - lo
    limit = np.array([w - 1.0, h - 1.0])
    scale = min(1.0, float(np.min(limit / np.maximum(extent, 1e-6))))
    outer, lo, hi = outer * scale, lo * scale, hi * scale
    hole = None if hole is None else hole * scale
    # Allowed translations keep [lo + t, hi + t] inside [0, limit].
    t_min, t_max = -lo, limit - hi
    if center is not None:
        c = np.array(center) + rng.uniform(-spread, spread, size=2)
        t = np.clip(c, t_min, t_max)
    else:
        t = rng.uniform(t_min, t_max)
    outer = np.round(outer + t, 2)
    hole = None if hole is None else np.round(hole + t, 2)
    return outer, hole


def _rasterize(outer: np.ndarray, hole: np.ndarray | None, h: int, w: int) -> np.ndarray:
    """(H, W) bool mask of a polygon (minus its hole), using COCO's own polygon fill."""
    mask = _poly_mask(outer, h, w)
    if hole is not None:
        mask &= ~_poly_mask(hole, h, w)
    return mask


def _poly_mask(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    rles = mask_utils.frPyObjects([poly.ravel().tolist()], h, w)
    return mask_utils.decode(rles)[:, :, 0].astype(bool)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """(H, W) float32 smooth noise in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR))


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(H, W) float32 linear ramp in [-0.5, 0.5] along a random direction."""
    theta = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = xx * math.cos(theta) + yy * math.sin(theta)
    span = float(ramp.max() - ramp.min())
    return (ramp - ramp.min()) / max(span, 1e-6) - 0.5


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Low-saturation textured background: a wall or sky region, a road below in some images.

    Returns:
        (H, W, 3) float32 RGB in [0, 1] and (H, W) uint8 MVD stuff label ids.
    """
    upper = WALL if rng.random() < 0.5 else SKY
    horizon = h if rng.random() < 0.5 else int(rng.uniform(0.45, 0.85) * h)
    stuff = np.full((h, w), upper.label_id, dtype=np.uint8)
    stuff[horizon:] = ROAD.label_id
    rgb = np.empty((h, w, 3), dtype=np.float32)
    rgb[:horizon] = _background_region(rng, horizon, w)
    if horizon < h:
        rgb[horizon:] = _background_region(rng, h - horizon, w)
    return rgb, stuff


def _background_region(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Saturation stays far below the shapes' (>= 0.55), so colour alone separates them.
    base = np.array(
        colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.75)),
        dtype=np.float32,
    )
    light = 1.0 + rng.uniform(0.05, 0.2) * _smooth_noise(rng, h, w, rng.uniform(12, 64))
    light += rng.uniform(0.0, 0.35) * _ramp(rng, h, w)
    if rng.random() < 0.35:
        # Low-contrast stripes: straight edges that are not rectangles.
        theta = rng.uniform(0.0, np.pi)
        period = rng.uniform(6.0, 24.0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2.0 * np.pi / period)
        light += rng.uniform(0.03, 0.08) * np.sin(phase)
    rgb = base * light[:, :, None]
    rgb += 0.02 * _smooth_noise(rng, h, w, 8.0)[:, :, None]
    return np.clip(rgb + rng.normal(0.0, 0.015, size=(h, w, 3)).astype(np.float32), 0.0, 1.0)


def _instance_texture(rng: np.random.Generator, cls: ShapeClass, h: int, w: int) -> np.ndarray:
    """(H, W, 3) float32 fill of one instance: a hue from the class's range, shaded, noisy."""
    hue = (cls.hue + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    # Value and shading bounded so that no channel clips: clipping would shift the hue.
    base = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.95), rng.uniform(0.5, 0.8))
    shade = 1.0 + 2.0 * rng.uniform(0.0, 0.2) * _ramp(rng, h, w)
    rgb = np.asarray(base, dtype=np.float32) * shade[:, :, None]
    rgb += rng.normal(0.0, 0.025, size=(h, w, 3)).astype(np.float32)
    return np.clip(rgb, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Writers


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    # 4:4:4 so that the colour edges of small shapes stay where the masks say they are.
    Image.fromarray(image).save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)


def _write_coco(scenes: Iterator[_Scene], out: Path, split: str) -> None:
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    for index, scene in enumerate(scenes):
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


def _coco_annotation(scene: _Scene, k: int, inst: _Instance, image_id: int, ann_id: int) -> dict:
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


def _write_mvd(scenes: Iterator[_Scene], out: Path, seed: int, split: str) -> None:
    image_dir = out / split / "images"
    instance_dir = out / split / MVD_VERSION / "instances"
    label_dir = out / split / MVD_VERSION / "labels"
    for d in (image_dir, instance_dir, label_dir):
        d.mkdir(parents=True, exist_ok=True)
    _write_text(out / f"config_{MVD_VERSION}.json", json.dumps(_mvd_config(), indent=2))
    for index, scene in enumerate(scenes):
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
