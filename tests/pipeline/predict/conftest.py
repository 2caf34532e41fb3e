"""Shared inputs of the prediction tests: real photographs in many forms, and models.

The photographs are scikit-image's sample images, which its wheel ships (nothing is
downloaded). `untrained_checkpoint` is a randomly initialised tiny model saved as a training
checkpoint: enough to run every code path, with score threshold 0 it detects plenty. `trained`
is a short `panet train` run, for its MLflow model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from panet_model import PANetConfig, build_panet
from pipeline.state_file import save_state

CATEGORIES = {1: "rectangle", 2: "ellipse", 3: "triangle"}  # ids as a data set may have them
# The synthetic set of the trained fixtures.
TRAIN_IMAGES, VAL_IMAGES = 120, 24


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    """The same detections in the same order, up to float rounding (BLAS reduction order)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g["image_id"], g["category_id"]) == (e["image_id"], e["category_id"])
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)
        assert g["bbox"] == pytest.approx(e["bbox"], abs=1e-2)
        iou = mask_utils.iou([g["segmentation"]], [e["segmentation"]], [0])[0, 0]
        assert g["segmentation"]["size"] == e["segmentation"]["size"] and iou >= 0.98


def skimage_data() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def exif_rotated_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose pixels are stored rotated, with the EXIF orientation that undoes it."""
    img = Image.fromarray(rgb)
    stored = img.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else img
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photographs in several sizes and modes, plus a truncated and a non-image file.

    Returns:
        {name: path}; "upright" is the (H, W) an EXIF-rotated file must decode to.
    """
    src = skimage_data()
    root = tmp_path_factory.mktemp("photos")
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kwargs) -> None:
        out[name] = root / name
        img.save(out[name], **kwargs)

    astronaut = Image.open(src / "astronaut.png")
    chelsea = Image.open(src / "chelsea.png")
    save("astronaut.png", astronaut)  # RGB 512 x 512
    save("chelsea_large.jpg", chelsea.resize((902, 600)), quality=90)  # RGB, upscaled
    save("coffee_small.png", Image.open(src / "coffee.png").resize((90, 60)))  # tiny
    save("camera_gray.png", Image.open(src / "camera.png"))  # L
    camera16 = (np.asarray(Image.open(src / "camera.png"), dtype=np.uint16) * 257).astype(np.uint16)
    save("camera_16bit.png", Image.fromarray(camera16))  # I;16
    save("logo_rgba.png", Image.open(src / "logo.png"))  # RGBA
    save("chelsea_palette.png", chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("chelsea_cmyk.jpg", chelsea.convert("CMYK"), quality=90)
    rocket = (src / "rocket.jpg").read_bytes()
    out["rocket.jpg"] = root / "rocket.jpg"
    out["rocket.jpg"].write_bytes(rocket)
    out["coffee_exif6.jpg"] = root / "coffee_exif6.jpg"
    out["coffee_exif6.jpg"].write_bytes(
        exif_rotated_jpeg(np.asarray(Image.open(src / "coffee.png").convert("RGB")), 6)
    )
    out["truncated.jpg"] = root / "truncated.jpg"
    out["truncated.jpg"].write_bytes(rocket[: len(rocket) // 3])
    out["not_an_image.png"] = root / "not_an_image.png"
    out["not_an_image.png"].write_text("this is not a picture\n")
    return out


def tiny_model_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    cfg = PANetConfig.preset("tiny")
    model = build_panet(cfg, num_classes=len(CATEGORIES) + 1)
    return {
        "model": model.state_dict(),
        "num_classes": len(CATEGORIES) + 1,
        "categories": dict(CATEGORIES),
        "config": {"model": {"preset": "tiny", **cfg.to_dict()}},
        "step": 0,
    }


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory of a randomly initialised tiny model."""
    directory = tmp_path_factory.mktemp("checkpoint")
    save_state(directory, **tiny_model_state())
    return directory


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def val_shards(synthetic: Path) -> Path:
    """The synthetic validation split as shards."""
    from pipeline.demo import ensure_shards

    return ensure_shards(synthetic / "raw", synthetic / "shards", "val", VAL_IMAGES, 1)


@pytest.fixture(scope="session")
def train_shards(synthetic: Path) -> Path:
    """The synthetic training split as shards."""
    from pipeline.demo import ensure_shards

    return ensure_shards(synthetic / "raw", synthetic / "shards", "train", TRAIN_IMAGES, 0)


@pytest.fixture(scope="session")
def trained(train_shards, val_shards, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`panet train` with a few steps on one worker: its checkpoint and its MLflow model.

    Returns:
        {"checkpoint": step directory, "run_id", "tracking_uri"}.
    """
    import ray

    from pipeline.config import load_job_config
    from pipeline.demo import CONFIG
    from pipeline.train.driver import run_training

    root = tmp_path_factory.mktemp("trained")
    job = load_job_config(
        CONFIG,
        {
            "name": "predict-fixture",
            "data.train": str(train_shards),
            "data.val": str(val_shards),
            "scaling.num_workers": 1,
            "solver.ims_per_batch": 2,
            "solver.max_steps": 4,
            "solver.warmup_steps": 2,
            "checkpoint.every_steps": 4,
            "eval.every_steps": 0,
            "eval.pictures": 1,
            "log_every": 2,
            "checkpoint.storage_path": str(root / "runs"),
        },
    )
    started_here = not ray.is_initialized()
    try:
        result = run_training(job)
    finally:
        if started_here:
            ray.shutdown()
    return {
        "checkpoint": Path(result["checkpoint"]),
        "run_id": result["run_id"],
        "tracking_uri": result["tracking_uri"],
    }
