"""One shard of a conversion, as a pool worker (or the converting process) writes it.

A worker converts its shard's items, writes `shard-NNNNN.parquet` to a temp file and renames it
into place (the shard appears complete or not at all), then writes the shard's done marker
`_progress/shard-NNNNN.json`: rows, sha256, bytes, counts and the records it skipped. Memory
stays bounded: at most `ROW_GROUP_ROWS` converted records are held at a time. A full disk
stops the conversion with a `DataError` naming the file; what was done stays for `--resume`.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.layout import PROGRESS_DIR
from pipeline.data.manifest import DataError, sha256_file
from pipeline.data.plan import BadRecordError, ItemResult, skip_entry
from pipeline.data.records import RECORD_SCHEMA

ROW_GROUP_ROWS = 32  # rows buffered before a Parquet row group is written: bounds worker memory


def shard_name(index: int) -> str:
    """File name of shard `index`: `shard-00007.parquet`."""
    return f"shard-{index:05d}.parquet"


def marker_path(out: Path, index: int) -> Path:
    """The done marker of shard `index`: `_progress/shard-00007.json`."""
    return out / PROGRESS_DIR / f"shard-{index:05d}.json"


@dataclass
class ShardTask:
    """One unit of work for a worker: convert items of shard `index` and write the shard."""

    out: str
    index: int
    items: list
    convert_item: Callable[[Any, Any], ItemResult]
    item_source: Callable[[Any, Any], str]
    context: Any
    strict: bool
    run_id: str


_ITEM_COUNTER: Any = None  # shared counter of items done, set in pool workers for progress


def init_worker(counter: Any) -> None:
    """Pool initializer: the shared counter the worker adds each item it converts to."""
    global _ITEM_COUNTER
    _ITEM_COUNTER = counter


def _count_item() -> None:
    if _ITEM_COUNTER is not None:
        with _ITEM_COUNTER.get_lock():
            _ITEM_COUNTER.value += 1


@functools.cache
def _column_compression() -> dict[str, str]:
    # Images are already JPEG/PNG: compressing them again costs CPU for nothing. Everything else
    # (RLE strings, boxes) compresses well. Leaf column paths come from an empty file's schema.
    buf = io.BytesIO()
    pq.write_table(RECORD_SCHEMA.empty_table(), buf)
    schema = pq.ParquetFile(io.BytesIO(buf.getvalue())).schema
    paths = [schema.column(i).path for i in range(len(schema))]
    return {p: ("none" if p == "image" else "zstd") for p in paths}


def _open_writer(path: Path) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        path,
        RECORD_SCHEMA,
        compression=_column_compression(),
        use_dictionary=False,
        # Min/max statistics of the image column would copy whole images into the footer.
        write_statistics=["image_id", "height", "width"],
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_full_names(path: Path) -> Iterator[None]:
    """Turn a full disk while writing `path` into a `DataError` naming it."""
    try:
        yield
    except OSError as err:
        if not storage.is_disk_full(err):
            raise
        raise DataError(
            f"{path}: no space left on device; the shards written so far are kept: free space "
            "and rerun with --resume"
        ) from err


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync it, then rename it over `path`.

    A reader sees either the old file, no file, or the complete new one: never half of it.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_names(path), open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _convert_safely(task: ShardTask, item: Any) -> ItemResult:
    try:
        return task.convert_item(item, task.context)
    except Exception as e:
        # An input nobody anticipated must not kill hours of work: report it like any bad record.
        source = task.item_source(item, task.context)
        return ItemResult(None, [skip_entry("image", source, "error", f"{type(e).__name__}: {e}")])


def write_shard(task: ShardTask, on_item: Callable[[], None] | None = None) -> dict:
    """Convert one shard's items, write the shard atomically, then its done marker.

    Args:
        task: the shard to write.
        on_item: called after each item (in-process progress); pool workers use a shared counter.

    Returns:
        The done marker (also written to `_progress/shard-NNNNN.json`). A full disk raises
        `DataError` naming the shard; its temp file is removed.
    """
    out = Path(task.out)
    name = shard_name(task.index)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    stats = _ShardStats()
    writer: pq.ParquetWriter | None = None
    buffer: list[dict] = []
    sha = None
    nbytes = 0
    try:
        with disk_full_names(out / name):
            for item in task.items:
                result = _convert_safely(task, item)
                if task.strict and result.skipped:
                    first = result.skipped[0]
                    raise BadRecordError(f"{first['source']}: {first['reason']} [{first['code']}]")
                stats.skipped.extend(result.skipped)
                if result.record is not None:
                    stats.add(result.record)
                    buffer.append(result.record)
                    if len(buffer) >= ROW_GROUP_ROWS:
                        writer = _write_rows(writer, tmp, buffer)
                        buffer = []
                (on_item or _count_item)()
            if buffer:
                writer = _write_rows(writer, tmp, buffer)
            if writer is not None:
                writer.close()
                writer = None
                _fsync(tmp)
                sha = sha256_file(tmp)
                nbytes = tmp.stat().st_size
                os.replace(tmp, out / name)  # the shard appears complete or not at all
    finally:
        if writer is not None:
            with suppress(OSError):  # a full disk fails the close too; the error above counts
                writer.close()
        tmp.unlink(missing_ok=True)
    marker = {
        "shard": task.index,
        "run": task.run_id,
        "path": name if stats.rows else None,  # a shard whose images were all skipped: no file
        "rows": stats.rows,
        "sha256": sha,
        "bytes": nbytes,
        "items": len(task.items),
        **stats.summary(),
    }
    atomic_write_json(marker_path(out, task.index), marker)
    return marker


def _write_rows(writer: pq.ParquetWriter | None, path: Path, rows: list[dict]) -> pq.ParquetWriter:
    """Append `rows` as one row group, opening the shard's writer on the first call."""
    writer = writer or _open_writer(path)
    writer.write_table(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))
    return writer


@dataclass
class _ShardStats:
    """What a shard's done marker says about its records, counted while they are written."""

    rows: int = 0
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    instances: Counter[int] = field(default_factory=Counter)
    crowd: Counter[int] = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> None:
        self.rows += 1
        self.heights.append(record["height"])
        self.widths.append(record["width"])
        for ann in record["annotations"]:
            (self.crowd if ann["iscrowd"] else self.instances)[ann["category_id"]] += 1

    def summary(self) -> dict:
        hs, ws = self.heights, self.widths
        return {
            "instances": {str(k): v for k, v in sorted(self.instances.items())},
            "crowd": {str(k): v for k, v in sorted(self.crowd.items())},
            "image_size": [min(hs), max(hs), min(ws), max(ws)] if self.rows else None,
            "skipped": self.skipped,
        }
