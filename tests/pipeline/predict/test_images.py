"""Decoding any image a user may have into upright 8-bit RGB; inputs from files, folders, shards."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.predict.images import ImageError, collect_inputs, decode, iter_items


def test_every_mode_decodes_to_upright_rgb(photos) -> None:
    cases = {
        "astronaut.png": (512, 512),
        "chelsea_large.jpg": (600, 902),
        "coffee_small.png": (60, 90),
        "camera_gray.png": (512, 512),
        "camera_16bit.png": (512, 512),
        "logo_rgba.png": (500, 500),
        "chelsea_palette.png": (300, 451),
        "chelsea_cmyk.jpg": (300, 451),
        "rocket.jpg": (427, 640),
        "coffee_exif6.jpg": (400, 600),  # stored 600 x 400, EXIF says rotate back
    }
    for name, (h, w) in cases.items():
        rgb = decode(photos[name].read_bytes(), name)
        assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8, name
        assert rgb.std() > 10, f"{name}: a flat image"


def test_16bit_gray_scales_to_8bit_and_exif_turns_pixels_upright(photos) -> None:
    gray8 = decode(photos["camera_gray.png"].read_bytes(), "8")
    gray16 = decode(photos["camera_16bit.png"].read_bytes(), "16")
    assert np.array_equal(gray8, gray16)
    assert np.array_equal(gray16[..., 0], gray16[..., 2])
    upright = np.asarray(Image.open(photos["coffee_small.png"]).convert("RGB"))
    rotated = decode(photos["coffee_exif6.jpg"].read_bytes(), "exif")
    small = np.asarray(Image.fromarray(rotated).resize((90, 60)), dtype=np.float64)
    assert np.abs(small - upright).mean() < 12  # same picture, JPEG and resize noise only
    flipped = np.asarray(Image.fromarray(rotated).rotate(90, expand=True).resize((90, 60)))
    assert np.abs(flipped.astype(np.float64) - upright).mean() > 30  # orientation matters


def test_alpha_is_composited_over_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque, fully transparent on the right half
    rgba[:, :2, 3] = 255
    import io

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    rgb = decode(buf.getvalue(), "alpha")
    assert (rgb[:, :2] == [200, 0, 0]).all() and (rgb[:, 2:] == 255).all()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated.jpg", "truncated.jpg: cannot decode"),
        ("not_an_image.png", "not_an_image.png: not an image"),
    ],
)
def test_unreadable_files_are_named(photos, name: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode(photos[name].read_bytes(), name)
    with pytest.raises(ImageError, match="empty.bin: empty file"):
        decode(b"", "empty.bin")


def test_inputs_from_files_folders_and_shards(photos, tmp_path) -> None:
    from pipeline.demo import ensure_shards

    shards = ensure_shards(tmp_path / "raw", tmp_path / "shards", "val", 3, 1)
    folder = photos["astronaut.png"].parent
    files, shard_dirs = collect_inputs([str(photos["rocket.jpg"]), str(folder), str(shards)])
    assert shard_dirs == [str(shards.resolve())]
    assert files[0] == str(photos["rocket.jpg"]) and len(files) == 1 + len(photos)
    items = list(iter_items(files, shard_dirs))
    assert len(items) == 3 + len(files)
    assert all(i.data and not i.path for i in items[:3])
    ids = [i.image_id for i in items]
    assert len(set(ids)) == len(ids) and ids[3] == max(ids[:3]) + 1
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        collect_inputs([str(tmp_path / "missing.jpg")])
