"""Reading a finished shard directory: its manifest, shard paths, records and schema check.

A shard directory OUT holds `shard-NNNNN.parquet` files (rows of `records.RECORD_SCHEMA`) and
`manifest.json`, written last and atomically by `writer.write_shards`: its presence means the
conversion is complete. Only pyarrow and the standard library: every reader (Ray Data, training,
evaluation, prediction) imports this without the converters' machinery.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.layout import PROGRESS_DIR, RUN_FILE
from pipeline.data.records import FORMAT_VERSION, MANIFEST_NAME, RECORD_SCHEMA

if TYPE_CHECKING:
    from pipeline.storage import StoragePath


class DataError(ValueError):
    """A problem the user can fix (missing file, bad layout, OUT in the way).

    The CLI prints it as one line and exits 2; it is a `ValueError` so that readers calling
    `load_manifest` can catch the documented exception type.
    """


def sha256_file(path: Path | StoragePath) -> str:
    """Hex sha256 of a file (local or on object storage), read in 1 MiB chunks."""
    h = hashlib.sha256()
    fs, where = storage.filesystem(str(path))
    with fs.open_input_stream(where) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def schema_mismatch(actual: pa.Schema, expected: pa.Schema = RECORD_SCHEMA) -> str | None:
    """The first field of `expected` that `actual` lacks or types differently (extra fields OK).

    Returns:
        e.g. "field 'annotations.bbox' has type list<item: double>, expected fixed_size_list<...>",
        or None if `actual` has every expected field with the expected type.
    """
    for f in expected:
        idx = actual.get_field_index(f.name)
        if idx < 0:
            return f"field '{f.name}' is missing"
        msg = _type_mismatch(f.name, actual.field(idx).type, f.type)
        if msg:
            return msg
    return None


def _type_mismatch(path: str, actual: pa.DataType, expected: pa.DataType) -> str | None:
    def wrong() -> str:
        return f"field '{path}' has type {actual}, expected {expected}"

    if pa.types.is_struct(expected):
        if not pa.types.is_struct(actual):
            return wrong()
        for child in expected:
            idx = actual.get_field_index(child.name)
            if idx < 0:
                return f"field '{path}.{child.name}' is missing"
            msg = _type_mismatch(f"{path}.{child.name}", actual.field(idx).type, child.type)
            if msg:
                return msg
        return None
    if isinstance(expected, (pa.ListType, pa.LargeListType, pa.FixedSizeListType)):
        if type(actual) is not type(expected):
            return wrong()
        if isinstance(expected, pa.FixedSizeListType) and actual.list_size != expected.list_size:
            return wrong()
        return _type_mismatch(path, actual.value_type, expected.value_type)
    return None if actual.equals(expected) else wrong()


def read_manifest_file(shard_dir: Path | StoragePath) -> dict:
    """The manifest of a finished conversion, checked for completeness and format version.

    Raises:
        DataError: no manifest (an unfinished conversion says so), unreadable, incomplete or
            of another format version.
    """
    path = shard_dir / MANIFEST_NAME
    if not path.is_file():
        if (shard_dir / PROGRESS_DIR / RUN_FILE).exists():
            raise DataError(
                f"{shard_dir}: conversion is unfinished (no {MANIFEST_NAME}); rerun the convert "
                "command with --resume"
            )
        raise DataError(f"{shard_dir}: no {MANIFEST_NAME}; not a shard directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{shard_dir}: {MANIFEST_NAME} is not readable JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{shard_dir}: {MANIFEST_NAME} is not a JSON object")
    missing = [
        k for k in ("format_version", "categories", "shards", "skipped") if k not in manifest
    ]
    if missing or manifest.get("complete") is not True:
        what = f"missing {', '.join(missing)}" if missing else "not marked complete"
        raise DataError(f"{shard_dir}: {MANIFEST_NAME} is incomplete ({what})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{shard_dir}: {MANIFEST_NAME} has format_version {manifest['format_version']!r}, "
            f"this code reads {FORMAT_VERSION}; convert the data set again"
        )
    return manifest


def load_manifest(shard_dir: str | Path | StoragePath) -> dict:
    """Read and check a finished shard directory's manifest before any row is read.

    Checks: the manifest exists and is complete, its format_version is
    `records.FORMAT_VERSION`, and every shard exists with a Parquet schema holding every field
    of `RECORD_SCHEMA` with its type (only footers are read: cheap).

    Args:
        shard_dir: directory written by `panet data convert`.

    Returns:
        The manifest dict.

    Raises:
        ValueError (a `DataError`): naming the directory, and the shard and field if relevant.
    """
    shard_dir = storage.as_path(shard_dir)
    manifest = read_manifest_file(shard_dir)
    for shard in manifest["shards"]:
        path = shard_dir / shard["path"]
        if not path.is_file():
            raise DataError(f"{shard_dir}: shard {shard['path']} listed in the manifest is missing")
        try:
            schema = pq.read_schema(str(path))
        except Exception as e:
            raise DataError(
                f"{shard_dir}: shard {shard['path']} is not readable Parquet ({e})"
            ) from None
        msg = schema_mismatch(schema)
        if msg:
            raise DataError(f"{shard_dir}: shard {shard['path']}: {msg} (records.RECORD_SCHEMA)")
    return manifest


def iter_records(shard_dir: str | Path) -> Iterator[dict]:
    """Every record of a finished shard directory as a dict, one row group in memory at a time.

    For tools and tests; training reads the shards with Ray Data.

    Args:
        shard_dir: directory written by `panet data convert`.

    Returns:
        An iterator of records (`RECORD_SCHEMA` rows) in shard order.
    """
    manifest = load_manifest(shard_dir)
    for path in shard_paths(manifest, shard_dir):
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i).to_pylist()


def shard_paths(manifest: dict, shard_dir: str | Path) -> list[str]:
    """Absolute paths of a manifest's shards, in shard order.

    Args:
        manifest: as returned by `load_manifest`.
        shard_dir: the directory the manifest was read from.

    Returns:
        One path per shard with rows.
    """
    if storage.is_uri(shard_dir):
        return [storage.join(shard_dir, s["path"]) for s in manifest["shards"]]
    base = os.path.abspath(shard_dir)
    return [os.path.join(base, s["path"]) for s in manifest["shards"]]


def build_manifest(
    run: dict, markers: list[dict], *, source: dict, categories: list[dict], pre_skipped: list[dict]
) -> dict:
    """The manifest of a finished conversion, from its shards' done markers.

    Args:
        run: the conversion's `_progress/run.json` (format version, fingerprint, shard size,
            number of input items).
        markers: the done marker of every shard, in shard order.
        source: the input's description, copied as it is.
        categories: `[{"id", "name", ...}, ...]`.
        pre_skipped: records the converter skipped while planning, before any shard.

    Returns:
        The manifest dict (`format_version`, `categories`, `shards`, `skipped`, counts, totals).
    """
    instances: Counter[int] = Counter()
    crowd: Counter[int] = Counter()
    skipped = list(pre_skipped)
    shards = []
    sizes = []
    for m in markers:
        if m["rows"]:
            shards.append(
                {"path": m["path"], "rows": m["rows"], "sha256": m["sha256"], "bytes": m["bytes"]}
            )
            sizes.append(m["image_size"])
        instances.update({int(k): v for k, v in m["instances"].items()})
        crowd.update({int(k): v for k, v in m["crowd"].items()})
        skipped.extend(m["skipped"])
    ids = [c["id"] for c in categories]
    return {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "shard_size": run["shard_size"],
        "fingerprint": run["fingerprint"],
        "categories": categories,
        "shards": shards,
        "instance_counts": {str(i): instances[i] for i in ids},
        "crowd_counts": {str(i): crowd[i] for i in ids},
        "image_size": _image_size(sizes),
        "skipped": skipped,
        "totals": {
            "images": run["items"],
            "records": sum(s["rows"] for s in shards),
            "instances": sum(instances.values()),
            "crowd": sum(crowd.values()),
            "skipped_images": sum(1 for s in skipped if s["kind"] == "image"),
            "skipped_annotations": sum(1 for s in skipped if s["kind"] == "annotation"),
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
    }


def _image_size(sizes: list[list[int]]) -> dict[str, int] | None:
    """The extremes of the shards' image sizes ([min_h, max_h, min_w, max_w] each), or None if
    no shard has rows."""
    if not sizes:
        return None
    return {
        "min_height": min(s[0] for s in sizes),
        "max_height": max(s[1] for s in sizes),
        "min_width": min(s[2] for s in sizes),
        "max_width": max(s[3] for s in sizes),
    }
