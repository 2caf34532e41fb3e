"""What `panet predict` reads: image files, folders and shard directories, any image mode.

Every input becomes `Item`s (an id, a name, and either a file path or the encoded bytes of a
shard record); `decode` turns the bytes of any image a user may have into (H, W, 3) uint8 RGB:
EXIF orientation applied, grayscale / palette / CMYK converted, alpha composited over white,
16-bit and float images scaled to 8 bits. Failures raise `ImageError` naming the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.image_limit import ImageTooLarge, open_image
from pipeline.data.manifest import load_manifest, shard_paths

# File extensions a folder is searched for (case-insensitive).
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)  # fmt: skip
SHARD_COLUMNS = ["image_id", "file_name", "image"]


class ImageError(ValueError):
    """An input that cannot be read as an image; the message names it."""


@dataclass(frozen=True)
class Item:
    """One image to predict."""

    image_id: int  # the result's image_id: a shard record's own, else 1, 2, ... in input order
    name: str  # the file path or the record's file_name, for messages and picture names
    path: str = ""  # an image file, read when the item is decoded
    data: bytes = b""  # or the encoded bytes of a shard record


def is_shard_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def collect_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Sort the command line's inputs into image files and shard directories.

    A folder that is not a shard directory contributes its image files (recursively, sorted).

    Args:
        inputs: paths of image files, folders and shard directories.

    Returns:
        (image file paths, shard directory paths).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: nothing to predict.
    """
    files: list[str] = []
    shards: list[str] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {raw!r} does not exist")
        if is_shard_dir(path):
            shards.append(str(path.resolve()))
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                warnings.warn(f"folder {raw!r} holds no image files", RuntimeWarning, stacklevel=2)
            files += [str(p) for p in found]
        else:
            files.append(str(path))
    if not files and not shards:
        raise ValueError(f"no images to predict in {list(inputs)}")
    return files, shards


def iter_items(files: Sequence[str], shards: Sequence[str]) -> Iterator[Item]:
    """Every image of `collect_inputs`'s result: shard records first, then files.

    Files get ids after the largest shard record id, so the ids never collide.
    """
    last_id = 0
    for shard_dir in shards:
        for path in shard_paths(load_manifest(shard_dir), shard_dir):
            for batch in pq.ParquetFile(path).iter_batches(columns=SHARD_COLUMNS, batch_size=32):
                for row in batch.to_pylist():
                    last_id = max(last_id, int(row["image_id"]))
                    yield Item(
                        int(row["image_id"]), str(row["file_name"]), data=row["image"] or b""
                    )
    for offset, path in enumerate(files, start=1):
        yield Item(last_id + offset, path, path=path)


def read_bytes(item: Item) -> bytes:
    """The encoded image of an item."""
    if not item.path:
        return item.data
    try:
        return Path(item.path).read_bytes()
    except OSError as err:
        raise ImageError(f"{item.name}: cannot read the file: {err.strerror or err}") from err


def decode(data: bytes, name: str) -> np.ndarray:
    """Encoded bytes of any image -> (H, W, 3) uint8 RGB, upright.

    Args:
        data: the file's bytes (JPEG, PNG, TIFF, BMP, GIF, WebP, ...; the first frame).
        name: the input's name, for error messages.

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        ImageError: empty, unknown format, truncated or corrupt data, an empty image, or more
            pixels than `image_limit.max_pixels()` (refused from the header, nothing decoded).
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with open_image(data) as img:
            img.load()  # decode now: truncated files fail here, not later
            rgb = to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unrecognised format)") from None
    except ImageTooLarge as err:
        raise ImageError(f"{name}: {err}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"{name}: cannot decode the image: {err}") from err
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{name}: empty image of size {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode -> (H, W, 3) uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scaled = values / 257.0  # 0..65535 -> 0..255
        else:  # 32-bit int or float: stretch the image's own range
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"))
