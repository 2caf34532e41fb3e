"""The synthetic data set: real COCO / MVD layouts, exact masks, the content the model must learn."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.data import synth, synth_scenes
from pipeline.data.synth import mvd_key, write_synthetic
from pipeline.data.synth_scenes import SHAPE_CLASSES

N_IMAGES = 60
SEED = 7
HUE = {c.category_id: c.hue for c in SHAPE_CLASSES}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic("coco", N_IMAGES, SEED, tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def coco(coco_root: Path) -> COCO:
    return COCO(str(coco_root / "annotations" / "instances_train.json"))


@pytest.fixture(scope="module")
def mvd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic("mvd", N_IMAGES, SEED, tmp_path_factory.mktemp("mvd"))


def _mvd_arrays(root: Path, key: str) -> tuple[np.ndarray, np.ndarray, Image.Image]:
    inst = Image.open(root / "train" / "v2.0" / "instances" / f"{key}.png")
    labels = Image.open(root / "train" / "v2.0" / "labels" / f"{key}.png")
    assert inst.mode == "I;16" and labels.mode == "L"
    image = Image.open(root / "train" / "images" / f"{key}.jpg")
    return np.asarray(inst).astype(np.int64), np.asarray(labels), image


# --- determinism and arguments ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["coco", "mvd"])
def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, fmt: str) -> None:
    a = _files(write_synthetic(fmt, 6, 3, tmp_path / "a"))
    b = _files(write_synthetic(fmt, 6, 3, tmp_path / "b"))
    assert a == b
    c = _files(write_synthetic(fmt, 6, 4, tmp_path / "c"))
    images = [k for k in a if k.endswith(".jpg")]
    assert len(images) == 6
    if fmt == "coco":  # same file names, other content
        assert all(a[k] != c[k] for k in images)
    else:  # MVD keys depend on the seed too
        assert not set(images) & set(c)


def test_splits_hold_different_scenes(tmp_path: Path) -> None:
    write_synthetic("coco", 3, 0, tmp_path, split="train")
    write_synthetic("coco", 3, 0, tmp_path, split="val")
    train = _files(tmp_path / "images" / "train")
    val = _files(tmp_path / "images" / "val")
    assert train.keys() == val.keys() and all(train[k] != val[k] for k in train)
    assert (tmp_path / "annotations" / "instances_val.json").is_file()


def test_bad_arguments_raise_naming_the_argument(tmp_path: Path) -> None:
    for kwargs, word in [
        ({"fmt": "voc"}, "format"),
        ({"n_images": -1}, "n_images"),
        ({"seed": -1}, "seed"),
        ({"min_size": 300, "max_size": 200}, "min_size"),
        ({"min_size": 16}, "min_size"),
        ({"split": "a/b"}, "split"),
    ]:
        args = {"fmt": "coco", "n_images": 1, "seed": 0, "out": tmp_path, **kwargs}
        with pytest.raises(ValueError, match=word):
            write_synthetic(**args)


def test_zero_images_is_a_valid_empty_data_set(tmp_path: Path) -> None:
    coco = COCO(str(write_synthetic("coco", 0, 0, tmp_path) / "annotations/instances_train.json"))
    assert coco.getImgIds() == [] and len(coco.getCatIds()) == len(SHAPE_CLASSES)


# --- COCO -------------------------------------------------------------------------------------


def test_coco_layout_categories_and_readme(coco_root: Path, coco: COCO) -> None:
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == [
        (1, "disc"),
        (2, "rectangle"),
        (3, "triangle"),
        (5, "ring"),
        (7, "star"),
    ]
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == N_IMAGES
    for info in images:
        path = coco_root / "images" / "train" / info["file_name"]
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (info["width"], info["height"])
    readme = (coco_root / "README.txt").read_text()
    assert f"seed: {SEED}" in readme and f"version {synth.SYNTH_VERSION}" in readme


def test_coco_masks_agree_with_bbox_area_and_are_disjoint(coco: COCO) -> None:
    kinds = set()
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        taken = np.zeros((info["height"], info["width"]), dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
            seg = ann["segmentation"]
            kind = "polygon" if isinstance(seg, list) else type(seg["counts"]).__name__
            kinds.add((kind, ann["iscrowd"]))
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == taken.shape
            assert mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)
            x0, y0 = xs.min(), ys.min()
            expected = [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
            assert ann["bbox"] == [float(v) for v in expected]
            if not ann["iscrowd"]:
                assert not (taken & mask).any(), f"annotation {ann['id']} overlaps another"
                taken |= mask
    # Polygons and compressed RLE for single instances, uncompressed RLE only for crowds.
    assert ("polygon", 0) in kinds and ("str", 0) in kinds
    assert kinds <= {("polygon", 0), ("str", 0), ("list", 1)}


def test_coco_content_covers_classes_sizes_empties(coco: COCO) -> None:
    anns = coco.loadAnns(coco.getAnnIds(iscrowd=False))
    assert {a["category_id"] for a in anns} == set(HUE)
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).sum() >= 10
    assert ((areas >= 32**2) & (areas < 96**2)).sum() >= 10
    assert (areas >= 96**2).sum() >= 3
    counts = [len(coco.getAnnIds(imgIds=i, iscrowd=False)) for i in coco.getImgIds()]
    assert 1 <= counts.count(0) <= N_IMAGES // 5
    assert max(counts) <= synth_scenes.MAX_INSTANCES
    # A non-ring instance stored as RLE is one that later shapes cover in part.
    ring = next(c.category_id for c in SHAPE_CLASSES if c.name == "ring")
    occluded = [a for a in anns if isinstance(a["segmentation"], dict) and a["category_id"] != ring]
    assert len(occluded) >= 5
    sizes = [(i["width"], i["height"]) for i in coco.loadImgs(coco.getImgIds())]
    assert all(160 <= s <= 320 for wh in sizes for s in wh)
    assert any(w != h for w, h in sizes)


def test_coco_pixels_show_the_class_colour(coco_root: Path, coco: COCO) -> None:
    """Masks are the painted pixels: their hue is the class's, the rest is low-saturation."""
    checked = 0
    for info in coco.loadImgs(coco.getImgIds()):
        with Image.open(coco_root / "images" / "train" / info["file_name"]) as im:
            hsv = np.asarray(im.convert("HSV")).astype(np.float64) / 255.0
        things = np.zeros(hsv.shape[:2], dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"], iscrowd=None)):
            mask = coco.annToMask(ann).astype(bool)
            things |= mask
            core = _erode(mask, 1)  # JPEG blurs the outermost pixel into its neighbour
            if core.sum() < 40:
                continue
            hue = np.median(
                np.angle(np.exp(2j * np.pi * (hsv[..., 0][core] - HUE[ann["category_id"]])))
            )
            assert abs(hue) / (2 * np.pi) < 0.06, f"annotation {ann['id']}: hue off by {hue}"
            assert np.median(hsv[..., 1][core]) > 0.4
            checked += 1
        background = ~_dilate(things, 2)
        assert np.median(hsv[..., 1][background]) < 0.3
    assert checked >= 50


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    return ~_dilate(~mask, r)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    padded = np.pad(mask, r)
    h, w = mask.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def test_crowd_groups_are_uncompressed_rle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CROWD_PROBABILITY", 1.0)
    root = write_synthetic("coco", 4, 1, tmp_path)
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    crowds = coco.loadAnns(coco.getAnnIds(iscrowd=True))
    assert len(crowds) == 4
    for ann in crowds:
        assert isinstance(ann["segmentation"]["counts"], list)
        assert coco.annToMask(ann).sum() == ann["area"] > 0


@pytest.mark.parametrize("first", [0, 1])
def test_uncompressed_counts_round_trip(first: int) -> None:
    rng = np.random.default_rng(first)
    mask = rng.random((7, 5)) < 0.5
    mask[0, 0] = bool(first)
    for m in (mask, np.zeros_like(mask), np.ones_like(mask)):
        rle = mask_utils.frPyObjects(
            {"size": list(m.shape), "counts": synth._uncompressed_counts(m)}, *m.shape
        )
        assert (mask_utils.decode(rle).astype(bool) == m).all()


def test_scenes_paint_exactly_their_masks_and_occlude_partly() -> None:
    """Before JPEG: each instance's pixels show its class hue, all other pixels are greyish."""
    partly_hidden = 0
    for index in range(40):
        scene = synth_scenes.render_scene(
            np.random.default_rng(index), 160, 320, crowd_probability=0.0
        )
        hsv = np.asarray(Image.fromarray(scene.image).convert("HSV")).astype(np.float64) / 255.0
        for k, inst in enumerate(scene.instances):
            visible = scene.visible(k)
            assert not (visible & ~inst.full).any()
            area = int(visible.sum())
            assert area >= max(
                synth_scenes.MIN_VISIBLE_PX, synth_scenes.MIN_VISIBLE_FRACTION * inst.full_area
            )
            partly_hidden += area < inst.full_area
            turn = hsv[..., 0][visible] - SHAPE_CLASSES[inst.class_index].hue
            off = np.abs(np.angle(np.exp(2j * np.pi * turn))) / (2 * np.pi)
            # Pixel noise may push a rare dark pixel out of range; a 1 px shift would not pass.
            assert np.mean((off < 0.08) & (hsv[..., 1][visible] > 0.4)) > 0.99
        assert np.mean(hsv[..., 1][scene.owner < 0] < 0.4) > 0.999
    assert partly_hidden >= 10


# --- Mapillary Vistas -------------------------------------------------------------------------


def test_mvd_layout_config_and_pngs(mvd_root: Path) -> None:
    config = json.loads((mvd_root / "config_v2.0.json").read_text())
    labels = config["labels"]
    for label in labels:
        assert set(label) == {"name", "readable", "color", "instances", "evaluate"}
        assert len(label["color"]) == 3
    things = {i for i, lab in enumerate(labels) if lab["instances"]}
    assert things == set(HUE)
    assert {labels[i]["name"] for i in things} == {f"shape--{c.name}" for c in SHAPE_CLASSES}
    assert sum(not lab["instances"] for lab in labels) >= 2
    keys = [mvd_key(SEED, "train", i) for i in range(N_IMAGES)]
    assert sorted(p.stem for p in (mvd_root / "train" / "images").iterdir()) == sorted(keys)
    seen_things: set[int] = set()
    for key in keys:
        inst, lab, image = _mvd_arrays(mvd_root, key)
        assert image.size == (inst.shape[1], inst.shape[0]) == (lab.shape[1], lab.shape[0])
        assert min(inst.shape) >= 160 and max(inst.shape) <= 320
        assert (inst // 256 == lab).all()
        ids = np.unique(inst)
        assert all(i // 256 < len(labels) for i in ids)
        per_label: dict[int, list[int]] = defaultdict(list)
        for value in ids:
            per_label[int(value) // 256].append(int(value) % 256)
        for label_id, indices in per_label.items():
            if label_id in things:
                assert indices == list(range(len(indices)))  # 0..n-1, like MVD
                seen_things.add(label_id)
            else:
                assert indices == [0]
    assert seen_things == things
    assert (mvd_root / "README.txt").is_file()


def test_mvd_and_coco_of_one_seed_hold_the_same_scenes(
    coco_root: Path, coco: COCO, mvd_root: Path
) -> None:
    """Same pictures, and every COCO instance is exactly one MVD instance (so MVD is disjoint)."""
    compared = 0
    for index, image_id in enumerate(sorted(coco.getImgIds())):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
        if any(a["iscrowd"] for a in anns):
            continue  # crowds are COCO-only, and they change the scene
        info = coco.loadImgs(image_id)[0]
        key = mvd_key(SEED, "train", index)
        coco_jpg = (coco_root / "images" / "train" / info["file_name"]).read_bytes()
        assert (mvd_root / "train" / "images" / f"{key}.jpg").read_bytes() == coco_jpg
        inst, _, _ = _mvd_arrays(mvd_root, key)
        mvd_things = {int(v) for v in np.unique(inst) if int(v) // 256 in HUE}
        assert len(mvd_things) == len(anns)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            values = np.unique(inst[mask])
            assert len(values) == 1 and values[0] // 256 == ann["category_id"]
            assert ((inst == values[0]) == mask).all()
        compared += 1
    assert compared >= N_IMAGES // 2
