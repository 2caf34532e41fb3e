"""The largest image any part decodes, checked from the header before a pixel is decoded.

A decompression bomb is a small file whose header declares a huge image (a PNG of 60000 x
60000 pixels zips to a few KB; decoded it is 10.8 GB). Conversion (`plan.read_image`, the MVD
and Cityscapes id maps), training's decode and `panet predict` open images with `open_image`,
which reads only the header and refuses an image of more than `max_pixels()` pixels, so memory
stays bounded by the limit: the converters report the record as skipped, predict names the file
and skips it. The limit is `PANET_MAX_IMAGE_PIXELS` (default 64 million, e.g. 8000 x 8000;
the paper's data sets stay under 25 million); set it in the environment of the command, or of
the Ray job (`runtime_env`) for training's workers.
"""

from __future__ import annotations

import io
import os
import re
import warnings

from PIL import Image

MAX_PIXELS_ENV = "PANET_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 64_000_000


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit."""


def max_pixels() -> int:
    """The limit: `PANET_MAX_IMAGE_PIXELS`, else `DEFAULT_MAX_PIXELS`.

    Raises:
        ValueError: the variable is not a positive integer (naming it).
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels")
    return value


def open_image(source: bytes | str | os.PathLike) -> Image.Image:
    """Open encoded bytes or a file lazily (header only) and check its size against the limit.

    PIL's own bomb check (a warning over `Image.MAX_IMAGE_PIXELS`, an error over twice that)
    stays in place, its warning silenced since this limit decides; a limit raised beyond PIL's
    error threshold raises PIL's `MAX_IMAGE_PIXELS` in this process to match.

    Returns:
        The opened, not yet decoded image; the caller closes it.

    Raises:
        ImageTooLarge: over the limit. PIL's errors for unreadable data pass through.
    """
    limit = max_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as err:  # PIL's threshold is above the limit
            found = re.search(r"\((\d+) pixels\)", str(err))
            size = f"{int(found.group(1)):,} pixels" if found else "more pixels"
            raise ImageTooLarge(_too_large(size, limit)) from None
    width, height = img.size
    if width * height > limit:
        img.close()
        raise ImageTooLarge(_too_large(f"{width}x{height} pixels ({width * height:,})", limit))
    return img


def _too_large(size: str, limit: int) -> str:
    return (
        f"image of {size} is over the limit of {limit:,} ({MAX_PIXELS_ENV}); a possible "
        "decompression bomb, not decoded"
    )
