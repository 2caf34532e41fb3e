"""What a converter hands the shard writer: a `ConversionPlan`, and what each item becomes.

A converter describes its input as a `ConversionPlan` (one small picklable item per image plus a
module-level `convert_item` function); `writer.write_shards` does the rest. A bad image or
annotation raises `RecordProblem` inside `convert_item` and becomes one `skipped` entry of the
manifest (or, under `--strict`, a `BadRecordError`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from pipeline.data.image_limit import ImageTooLarge, open_image
from pipeline.data.manifest import DataError

IMAGE_FORMATS = ("JPEG", "PNG")  # what the records contract promises readers in `image`


class BadRecordError(DataError):
    """Raised under `--strict` on the first bad image or annotation, naming it and the reason."""


class RecordProblem(Exception):
    """Why one image or annotation cannot be converted; becomes one `skipped` entry.

    `source` names the file at fault when the raiser knows it better than the caller (an image
    and its id map are read together, and either may be the bad one).
    """

    def __init__(self, code: str, reason: str, source: str | None = None) -> None:
        super().__init__(code, reason, source)  # all in args: the exception survives pickling
        self.code = code
        self.reason = reason
        self.source = source


def skip_entry(kind: str, source: str, code: str, reason: str) -> dict:
    """One `skipped` entry of the manifest.

    Args:
        kind: "image" (the whole record is dropped) or "annotation" (only that instance).
        source: the file, or the annotation (file, annotation id, image), that was skipped.
        code: short machine-readable reason, used to group the summary (e.g. "missing_image").
        reason: human-readable reason.

    Returns:
        `{"source", "reason", "kind", "code"}`.
    """
    return {"source": source, "reason": reason, "kind": kind, "code": code}


@dataclass
class ItemResult:
    """What a converter made of one input item: a record (or None if the image was skipped)."""

    record: dict | None
    skipped: list[dict] = field(default_factory=list)


@dataclass
class ConversionPlan:
    """Everything `write_shards` needs to know about one input data set.

    `items`, `context` and the two functions travel to worker processes, so they must be
    picklable: items are small (paths, annotation dicts), never decoded images, and the
    functions are module-level.
    """

    name: str  # format name for messages and the manifest, e.g. "coco"
    source: dict  # description of the input, copied into the manifest
    categories: list[dict]  # [{"id", "name", "color"}, ...]
    items: Sequence[Any]  # one per input image, in the order that fixes shard assignment
    convert_item: Callable[[Any, Any], ItemResult]  # (item, context) -> ItemResult
    item_source: Callable[[Any, Any], str]  # (item, context) -> file named in error reports
    context: Any  # shared read-only data for convert_item (roots, category ids)
    fingerprint: str  # identity of the input: resume refuses a directory made from another
    pre_skipped: list[dict] = field(default_factory=list)  # problems found while planning


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (file hashes, paths, sorted file lists).

    Returns:
        Hex sha256.
    """
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def read_image(path: Path, expected_hw: tuple[int, int] | None = None) -> tuple[bytes, int, int]:
    """Read an image's original bytes and check that they decode to the expected size.

    The bytes are returned unchanged (never re-encoded); decoding here only proves a reader
    will be able to decode them later.

    Args:
        path: image file.
        expected_hw: declared (height, width), or None if the source declares none.

    Returns:
        (encoded bytes, height, width).

    Raises:
        RecordProblem: missing, unreadable, undecodable, unsupported format, wrong size, or
            more pixels than `image_limit.max_pixels()` (refused from the header).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordProblem("missing_image", "image file not found") from None
    except OSError as e:
        raise RecordProblem("unreadable_image", f"cannot read image file ({e})") from None
    try:
        # verify() checks structure (PNG CRCs); load() decodes every pixel, catching truncation.
        with open_image(data) as im:
            fmt = im.format
            im.verify()
        with open_image(data) as im:
            im.load()
            w, h = im.size
    except ImageTooLarge as e:
        raise RecordProblem("image_too_large", str(e)) from None
    except UnidentifiedImageError:
        raise RecordProblem("undecodable_image", "not an image file (unknown format)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise RecordProblem("undecodable_image", f"not a decodable image ({e})") from None
    if fmt not in IMAGE_FORMATS:
        raise RecordProblem("unsupported_image_format", f"image format {fmt}, expected JPEG/PNG")
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        eh, ew = expected_hw
        raise RecordProblem("image_size_mismatch", f"declared {ew}x{eh} (WxH), file is {w}x{h}")
    return data, h, w
