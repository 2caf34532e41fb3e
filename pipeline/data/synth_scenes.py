"""The synthetic data set's scenes: coloured shapes on textured backgrounds, with exact masks.

Five shape classes differ by shape and by hue range; occlusion, rings with holes, sizes from
tiny to large, textured backgrounds and empty images keep the task honest. `synth` writes the
scenes in the COCO and MVD layouts.

Masks are exact by construction: each pixel of the picture is painted by the one instance (or
background region) that owns it in a label map, and every annotation is read back from that
map. Unoccluded polygon shapes are rasterised with pycocotools' own polygon fill, so
`COCO.annToMask` gives back exactly the painted pixels.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

MIN_VISIBLE_PX = 16  # an instance showing fewer pixels than this is unlearnable noise
MIN_VISIBLE_FRACTION = 0.3  # ... and so is one hidden by more than 70 % of its shape
EMPTY_FRACTION = 0.07  # share of images drawn without any instance (negatives)
MAX_INSTANCES = 6
PLACEMENT_TRIES = 8  # attempts to place one instance without hiding an earlier one too much
MIN_SIDE = 12  # smallest shape diameter in px: COCO "small" objects must exist
MAX_SIDE_FRACTION = 0.9  # largest shape diameter, as a fraction of the shorter image side
SIZE_POWER = 0.6  # < 1 tilts the log-uniform diameter towards large: about 37/55/8 % S/M/L
HUE_JITTER = 0.035  # half-width of a class's hue range (hue in [0, 1))


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


@dataclass
class Instance:
    """One annotated thing of a scene: a shape, or (COCO only) a crowd group of shapes."""

    class_index: int  # index into SHAPE_CLASSES
    full: np.ndarray  # (H, W) bool: the whole shape, before later shapes cover it
    full_area: int
    polygon: list[float] | None  # the shape as one COCO polygon; None for rings and crowds
    crowd: bool


@dataclass
class Scene:
    """A rendered picture and the label map its annotations are read from."""

    image: np.ndarray  # (H, W, 3) uint8
    stuff: np.ndarray  # (H, W) uint8 MVD stuff label id of the background at each pixel
    owner: np.ndarray  # (H, W) int16 index into `instances` of the visible one, -1: background
    instances: list[Instance]

    def visible(self, k: int) -> np.ndarray:
        """(H, W) bool: the pixels that show instance `k`."""
        return self.owner == k


def scenes(
    seed: int, split: str, n_images: int, min_size: int, max_size: int, crowd_probability: float
) -> Iterator[Scene]:
    """The scenes of one split, each a pure function of `(seed, split, index)`.

    Args:
        seed, split: fix every scene; different splits of one seed hold different scenes.
        n_images: number of scenes.
        min_size, max_size: bounds of each image side in px (height and width drawn apart).
        crowd_probability: share of scenes with one crowd group (0 for MVD, which has none).

    Returns:
        The scenes, rendered one by one as they are taken.
    """
    # crc32, not hash(): Python salts str hashes per process.
    split_code = zlib.crc32(split.encode())
    for index in range(n_images):
        # One stream per scene: scene i does not depend on how many were drawn before it.
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
        yield render_scene(rng, min_size, max_size, crowd_probability)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_scene(
    rng: np.random.Generator, min_size: int, max_size: int, crowd_probability: float
) -> Scene:
    """One scene drawn from `rng`: a background, then shapes placed one on top of another."""
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    background, stuff = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int16)
    instances: list[Instance] = []
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
    return Scene(image=image8, stuff=stuff, owner=owner, instances=instances)


def _place(
    owner: np.ndarray, instances: list[Instance], visible_area: list[int], candidate: Instance
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


def _sample_instance(rng: np.random.Generator, h: int, w: int) -> Instance:
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
    return Instance(class_index, full, int(full.sum()), polygon=polygon, crowd=False)


def _sample_crowd(rng: np.random.Generator, h: int, w: int) -> Instance:
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
    return Instance(class_index, full, int(full.sum()), polygon=None, crowd=True)


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
