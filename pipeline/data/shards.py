"""Sharded Parquet output of the converters: writer, manifest, resume, inspect and verify.

A shard directory OUT holds:

    OUT/shard-00000.parquet ...       rows of `records.RECORD_SCHEMA`; shard k holds the records
                                      of input items [k * shard_size, (k + 1) * shard_size)
    OUT/_progress/run.json            what is being converted (input fingerprint, shard size):
                                      `--resume` refuses to mix two different conversions
    OUT/_progress/shard-00000.json    done marker of shard k: rows, sha256, stats, skipped records
    OUT/manifest.json                 written last and atomically: its presence means "complete"

Files starting with "_" or "." are ignored by pyarrow's and Ray Data's directory discovery, so the
markers and temp files never show up as data. A converter describes its input as a
`ConversionPlan` (one small picklable item per image plus a module-level `convert_item`
function); `write_shards` does the rest: process pool, bounded in-flight work, atomic shard
writes, resume, progress and the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.data.progress import Progress, format_bytes, format_duration
from pipeline.data.records import FORMAT_VERSION, MANIFEST_NAME, RECORD_SCHEMA

if TYPE_CHECKING:
    from pipeline.storage import StoragePath

DEFAULT_SHARD_SIZE = 256  # rows per shard: ~40 MB of COCO JPEGs, enough files to spread reads
ROW_GROUP_ROWS = 32  # rows buffered before a Parquet row group is written: bounds worker memory
PROGRESS_DIR = "_progress"
RUN_FILE = "run.json"
IMAGE_FORMATS = ("JPEG", "PNG")  # what the records contract promises readers in `image`
POLL_SECONDS = 0.5  # how often the parent wakes up to refresh the progress line


class DataError(ValueError):
    """A problem the user can fix (missing file, bad layout, OUT in the way).

    The CLI prints it as one line and exits 2; it is a `ValueError` so that readers calling
    `load_manifest` can catch the documented exception type.
    """


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
        RecordProblem: missing, unreadable, undecodable, unsupported format or wrong size.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordProblem("missing_image", "image file not found") from None
    except OSError as e:
        raise RecordProblem("unreadable_image", f"cannot read image file ({e})") from None
    try:
        # verify() checks structure (PNG CRCs); load() decodes every pixel, catching truncation.
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            w, h = im.size
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


# ---------------------------------------------------------------------------------------------
# Writing


def shard_name(index: int) -> str:
    """File name of shard `index`: `shard-00007.parquet`."""
    return f"shard-{index:05d}.parquet"


def _marker_path(out: Path, index: int) -> Path:
    return out / PROGRESS_DIR / f"shard-{index:05d}.json"


@dataclass
class _ShardTask:
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


def _init_worker(counter: Any) -> None:
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


def sha256_file(path: Path | StoragePath) -> str:
    """Hex sha256 of a file (local or on object storage), read in 1 MiB chunks."""
    h = hashlib.sha256()
    fs, where = storage.filesystem(str(path))
    with fs.open_input_stream(where) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync it, then rename it over `path`.

    A reader sees either the old file, no file, or the complete new one: never half of it.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _convert_safely(task: _ShardTask, item: Any) -> ItemResult:
    try:
        return task.convert_item(item, task.context)
    except Exception as e:
        # An input nobody anticipated must not kill hours of work: report it like any bad record.
        source = task.item_source(item, task.context)
        return ItemResult(None, [skip_entry("image", source, "error", f"{type(e).__name__}: {e}")])


def _write_shard(task: _ShardTask, on_item: Callable[[], None] | None = None) -> dict:
    """Convert one shard's items, write the shard atomically, then its done marker.

    Memory stays bounded: at most `ROW_GROUP_ROWS` converted records are held at a time.

    Args:
        task: the shard to write.
        on_item: called after each item (in-process progress); pool workers use a shared counter.

    Returns:
        The done marker (also written to `_progress/shard-NNNNN.json`).
    """
    out = Path(task.out)
    name = shard_name(task.index)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    writer: pq.ParquetWriter | None = None
    buffer: list[dict] = []
    skipped: list[dict] = []
    instances: Counter[int] = Counter()
    crowd: Counter[int] = Counter()
    rows = 0
    hs: list[int] = []
    ws: list[int] = []
    sha = None
    nbytes = 0
    try:
        for item in task.items:
            result = _convert_safely(task, item)
            if task.strict and result.skipped:
                first = result.skipped[0]
                raise BadRecordError(f"{first['source']}: {first['reason']} [{first['code']}]")
            skipped.extend(result.skipped)
            record = result.record
            if record is not None:
                rows += 1
                hs.append(record["height"])
                ws.append(record["width"])
                for ann in record["annotations"]:
                    (crowd if ann["iscrowd"] else instances)[ann["category_id"]] += 1
                buffer.append(record)
                if len(buffer) >= ROW_GROUP_ROWS:
                    writer = writer or _open_writer(tmp)
                    writer.write_table(pa.Table.from_pylist(buffer, schema=RECORD_SCHEMA))
                    buffer = []
            if on_item is not None:
                on_item()
            else:
                _count_item()
        if buffer:
            writer = writer or _open_writer(tmp)
            writer.write_table(pa.Table.from_pylist(buffer, schema=RECORD_SCHEMA))
            buffer = []
        if writer is not None:
            writer.close()
            writer = None
            _fsync(tmp)
            sha = sha256_file(tmp)
            nbytes = tmp.stat().st_size
            os.replace(tmp, out / name)  # the shard appears complete or not at all
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    marker = {
        "shard": task.index,
        "run": task.run_id,
        "path": name if rows else None,  # a shard whose images were all skipped has no file
        "rows": rows,
        "sha256": sha,
        "bytes": nbytes,
        "items": len(task.items),
        "instances": {str(k): v for k, v in sorted(instances.items())},
        "crowd": {str(k): v for k, v in sorted(crowd.items())},
        "image_size": [min(hs), max(hs), min(ws), max(ws)] if rows else None,
        "skipped": skipped,
    }
    atomic_write_json(_marker_path(out, task.index), marker)
    return marker


def _run_id(run: dict) -> str:
    # Markers carry it: a marker from another input or shard size never counts as "done".
    full = fingerprint(run["format_version"], run["fingerprint"], run["shard_size"], run["items"])
    return full[:16]


def _prepare_out(out: Path, run: dict, resume: bool) -> None:
    """Check that OUT may be written, then mark it as ours and incomplete.

    Raises:
        DataError: OUT is a file, a non-empty directory we did not make, a finished or
            unfinished conversion without `--resume`, or a conversion of other input/settings.
    """
    run_file = out / PROGRESS_DIR / RUN_FILE
    manifest = out / MANIFEST_NAME
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    ours = run_file.exists() or manifest.exists()
    if non_empty and not ours:
        raise DataError(
            f"{out}: directory is not empty and holds no conversion (no {MANIFEST_NAME} or "
            f"{PROGRESS_DIR}/{RUN_FILE}); choose an empty or new directory"
        )
    if ours and not resume:
        if manifest.exists():
            raise DataError(
                f"{out}: already holds a complete conversion; pass --resume to check and finish "
                "it, or choose a new directory"
            )
        raise DataError(
            f"{out}: holds an unfinished conversion; pass --resume to continue it, or choose a "
            "new directory"
        )
    if ours and run_file.exists():
        previous = _read_json(run_file)
        if previous is not None:
            changed = [
                f"{key} {previous.get(key)!r} -> {run[key]!r}"
                for key in ("format_version", "shard_size", "items")
                if previous.get(key) != run[key]
            ]
            if previous.get("fingerprint") != run["fingerprint"]:
                changed.append("input files or options differ")
            if changed:
                raise DataError(
                    f"{out}: was started from other input or settings ({'; '.join(changed)}); "
                    "choose a new directory or rerun with the original ones"
                )
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    # From here on OUT is "incomplete" until the new manifest lands (written last).
    manifest.unlink(missing_ok=True)
    for stale in [*out.glob(".*.tmp-*"), *(out / PROGRESS_DIR).glob(".*.tmp-*")]:
        stale.unlink(missing_ok=True)  # leftovers of a killed run
    atomic_write_json(run_file, run)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finished_marker(out: Path, index: int, run_id: str) -> dict | None:
    """The done marker of shard `index` if the shard is complete and intact, else None."""
    marker = _read_json(_marker_path(out, index))
    if not isinstance(marker, dict) or marker.get("run") != run_id:
        return None
    if marker.get("rows"):
        path = out / str(marker.get("path"))
        if not path.is_file() or path.stat().st_size != marker.get("bytes"):
            return None
        if sha256_file(path) != marker.get("sha256"):
            return None
    return marker


def write_shards(
    plan: ConversionPlan,
    out: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    strict: bool = False,
    resume: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict:
    """Convert every item of `plan` into Parquet shards under `out`, then write the manifest.

    Shard k always holds the records of items [k * shard_size, (k + 1) * shard_size), so a
    resumed run redoes exactly the shards that have no intact done marker.

    Args:
        plan: the input, as built by a converter's `plan_*` function.
        out: output directory (created if missing).
        shard_size: input items (images) per shard.
        workers: worker processes; 1 converts in this process; default `os.cpu_count()`.
        strict: fail on the first bad image/annotation instead of skipping it.
        resume: continue (or check and re-finish) a conversion already in `out`.
        progress: print progress lines and the final summary to `stream`.
        stream: where progress goes (default: stderr).
        on_shard_done: called with k in this process after shard k is done (tests use it to
            simulate a kill).

    Returns:
        The manifest, as written to `out/manifest.json`.

    Raises:
        DataError: bad arguments or OUT in the way. BadRecordError: under `strict`.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size: expected >= 1, got {shard_size}")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise DataError(f"--workers: expected >= 1, got {workers}")
    if strict and plan.pre_skipped:
        first = plan.pre_skipped[0]
        raise BadRecordError(f"{first['source']}: {first['reason']} [{first['code']}]")
    if storage.is_uri(out):
        return _write_to_object_storage(
            plan,
            str(out),
            shard_size=shard_size,
            workers=workers,
            strict=strict,
            resume=resume,
            progress=progress,
            stream=stream,
            on_shard_done=on_shard_done,
        )
    out = Path(out)
    n_items = len(plan.items)
    n_shards = math.ceil(n_items / shard_size)
    run = {
        "format_version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "shard_size": shard_size,
        "items": n_items,
        "source": plan.source,
    }
    run_id = _run_id(run)
    _prepare_out(out, run, resume)

    markers: dict[int, dict] = {}
    if resume:
        for k in range(n_shards):
            marker = _finished_marker(out, k, run_id)
            if marker is not None:
                markers[k] = marker
    todo = [k for k in range(n_shards) if k not in markers]
    for k in todo:  # a half-finished or stale shard k must not survive next to the new one
        (out / shard_name(k)).unlink(missing_ok=True)
        _marker_path(out, k).unlink(missing_ok=True)

    reused = len(markers)
    prog = Progress(
        n_items,
        label=f"convert {plan.name}",
        initial=sum(m["items"] for m in markers.values()),
        stream=stream,
        enabled=progress,
    )

    def task(k: int) -> _ShardTask:
        return _ShardTask(
            out=str(out),
            index=k,
            items=list(plan.items[k * shard_size : (k + 1) * shard_size]),
            convert_item=plan.convert_item,
            item_source=plan.item_source,
            context=plan.context,
            strict=strict,
            run_id=run_id,
        )

    if workers == 1 or len(todo) <= 1:
        _run_inline(todo, task, markers, prog, on_shard_done)
    else:
        _run_pool(todo, task, markers, prog, on_shard_done, workers)

    manifest = _build_manifest(plan, run, [markers[k] for k in range(n_shards)])
    atomic_write_json(out / MANIFEST_NAME, manifest)
    if progress:
        print(
            format_summary(manifest, elapsed=prog.elapsed(), reused_shards=reused),
            file=stream or sys.stderr,
            flush=True,
        )
    return manifest


def _write_to_object_storage(plan: ConversionPlan, out: str, **options: Any) -> dict:
    """`write_shards` to an `s3://` / `gs://` URI: convert into a local staging folder, upload.

    The shards go up first and `manifest.json` last, so a reader never sees a manifest whose
    shards are missing. The staging folder needs room for the whole shard set.
    """
    if options.pop("resume"):
        raise DataError(f"--resume: works with a local --out; {out!r} is object storage")
    if storage.exists(storage.join(out, MANIFEST_NAME)):
        raise DataError(
            f"--out {out!r} already holds a shard set ({MANIFEST_NAME}); choose another"
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="panet-convert-") as staging:
        manifest = write_shards(plan, staging, resume=False, **options)
        for entry in sorted(Path(staging).iterdir()):
            if entry.name in (MANIFEST_NAME, PROGRESS_DIR):
                continue
            target = storage.join(out, entry.name)
            if entry.is_dir():
                storage.upload_dir(entry, target)
            else:
                storage.write_bytes(target, entry.read_bytes())
        storage.write_bytes(
            storage.join(out, MANIFEST_NAME), (Path(staging) / MANIFEST_NAME).read_bytes()
        )
    return manifest


def _run_inline(
    todo: list[int],
    task: Callable[[int], _ShardTask],
    markers: dict[int, dict],
    prog: Progress,
    on_shard_done: Callable[[int], None] | None,
) -> None:
    done = 0

    def on_item() -> None:
        nonlocal done
        done += 1
        prog.update(done)

    for k in todo:
        markers[k] = _write_shard(task(k), on_item)
        if on_shard_done is not None:
            on_shard_done(k)


def _run_pool(
    todo: list[int],
    task: Callable[[int], _ShardTask],
    markers: dict[int, dict],
    prog: Progress,
    on_shard_done: Callable[[int], None] | None,
    workers: int,
) -> None:
    # spawn, not fork: the caller may have threads (Ray, MLflow) that fork would copy mid-lock.
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    pending = iter(todo)
    running: dict[Future, int] = {}
    n_workers = min(workers, len(todo))
    with ProcessPoolExecutor(
        max_workers=n_workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)
    ) as pool:
        try:
            while True:
                # Bounded in-flight work: a few shard tasks queued per worker, never all of them.
                while len(running) < 2 * n_workers:
                    k = next(pending, None)
                    if k is None:
                        break
                    running[pool.submit(_write_shard, task(k))] = k
                if not running:
                    break
                finished, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                prog.update(counter.value)
                for fut in finished:
                    k = running.pop(fut)
                    markers[k] = fut.result()  # re-raises BadRecordError from the worker
                    if on_shard_done is not None:
                        on_shard_done(k)
        except BaseException:
            # Shards already running finish (and stay valid for --resume); queued ones are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _build_manifest(plan: ConversionPlan, run: dict, markers: list[dict]) -> dict:
    instances: Counter[int] = Counter()
    crowd: Counter[int] = Counter()
    skipped = list(plan.pre_skipped)
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
    ids = [c["id"] for c in plan.categories]
    image_size = None
    if sizes:
        image_size = {
            "min_height": min(s[0] for s in sizes),
            "max_height": max(s[1] for s in sizes),
            "min_width": min(s[2] for s in sizes),
            "max_width": max(s[3] for s in sizes),
        }
    return {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": plan.source,
        "shard_size": run["shard_size"],
        "fingerprint": run["fingerprint"],
        "categories": plan.categories,
        "shards": shards,
        "instance_counts": {str(i): instances[i] for i in ids},
        "crowd_counts": {str(i): crowd[i] for i in ids},
        "image_size": image_size,
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


def group_skipped(skipped: list[dict]) -> list[dict]:
    """Group skipped entries by (kind, code), most frequent first.

    Returns:
        `[{"kind", "code", "count", "example": first entry}, ...]`.
    """
    groups: dict[tuple[str, str], dict] = {}
    for s in skipped:
        key = (s.get("kind", "?"), s.get("code", "?"))
        if key not in groups:
            groups[key] = {"kind": key[0], "code": key[1], "count": 0, "example": s}
        groups[key]["count"] += 1
    return sorted(groups.values(), key=lambda g: (-g["count"], g["kind"], g["code"]))


def _format_skipped(skipped: list[dict], indent: str = "  ") -> list[str]:
    lines = []
    for g in group_skipped(skipped):
        ex = g["example"]
        lines.append(
            f"{indent}{g['count']} x {g['kind']} {g['code']}, e.g. {ex['source']}: {ex['reason']}"
        )
    return lines


# What to check when a conversion keeps (almost) nothing, by input format.
YIELD_HINTS = {
    "coco": "is --images the folder holding the annotation file's file_name paths?",
    "mvd": "are --root and --split the data set root and the split folder?",
    "cityscapes": "are --root and --split the data set root and the split folder?",
}


def yield_problem(manifest: dict) -> str | None:
    """One line with a hint when a conversion kept no record or skipped most images, else None.

    Args:
        manifest: a finished conversion's manifest.
    """
    t = manifest["totals"]
    images, records = int(t["images"]), int(t["records"])
    if images == 0:
        return "the input lists no images; is it the right annotation file or split?"
    if records > 0 and 2 * int(t["skipped_images"]) <= images:
        return None
    groups = [g for g in group_skipped(manifest["skipped"]) if g["kind"] == "image"]
    cause = ""
    if groups:
        ex = groups[0]["example"]
        cause = f", {groups[0]['count']} x {groups[0]['code']}, e.g. {ex['source']}: {ex['reason']}"
    hint = YIELD_HINTS.get(str(manifest.get("source", {}).get("format")), "")
    return f"kept {records} of {images} images ({t['skipped_images']} skipped{cause}); {hint}"


def format_summary(manifest: dict, *, elapsed: float, reused_shards: int = 0) -> str:
    """The end-of-conversion summary: records, shards, bytes, time, skipped grouped by reason.

    Args:
        manifest: the manifest just written.
        elapsed: seconds this run took.
        reused_shards: shards found finished by `--resume`.

    Returns:
        Multi-line text.
    """
    t = manifest["totals"]
    name = manifest["source"].get("format", "?")
    lines = [
        f"convert {name}: {t['records']} records ({t['instances']} instances, {t['crowd']} crowd) "
        f"from {t['images']} images in {t['shards']} shards, {format_bytes(t['bytes'])}, "
        f"{format_duration(elapsed)}"
    ]
    if reused_shards:
        lines.append(f"  resumed: {reused_shards} finished shards kept as they were")
    if manifest["skipped"]:
        lines.append(
            f"  skipped {t['skipped_images']} images and {t['skipped_annotations']} annotations:"
        )
        lines += _format_skipped(manifest["skipped"], indent="    ")
    else:
        lines.append("  skipped nothing")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading, inspecting, verifying


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


def _read_manifest_file(shard_dir: Path | StoragePath) -> dict:
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


def load_manifest(shard_dir: str | Path) -> dict:
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
    manifest = _read_manifest_file(shard_dir)
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


def verify_shard(shard_dir: Path | StoragePath, shard: dict) -> list[str]:
    """Re-check one shard against its manifest entry: presence, sha256, row count, schema.

    Returns:
        Problems found, each naming the shard; empty if it is intact.
    """
    path = shard_dir / shard["path"]
    name = shard["path"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    sha = sha256_file(path)
    if sha != shard["sha256"]:
        problems.append(f"{name}: sha256 mismatch (manifest {shard['sha256']}, file {sha})")
    try:
        meta = pq.read_metadata(str(path))
        if meta.num_rows != shard["rows"]:
            problems.append(f"{name}: {meta.num_rows} rows, manifest says {shard['rows']}")
        msg = schema_mismatch(meta.schema.to_arrow_schema())
        if msg:
            problems.append(f"{name}: {msg}")
    except Exception as e:
        problems.append(f"{name}: not readable Parquet ({e})")
    return problems


def inspect_shards(shard_dir: str | Path, *, verify: bool = False) -> dict:
    """Summarise a shard directory from its manifest; with `verify`, re-check every shard.

    Args:
        shard_dir: directory written by `panet data convert`.
        verify: re-hash every shard and compare row counts and schema with the manifest.

    Returns:
        `{"dir", "source", "format_version", "totals", "image_size", "categories" (with
        "instances" and "crowd" counts), "bytes_on_disk", "skipped_groups", "verified",
        "problems"}`.

    Raises:
        DataError: no (complete) manifest.
    """
    shard_dir = storage.as_path(shard_dir)
    manifest = _read_manifest_file(shard_dir)
    instance_counts = manifest.get("instance_counts", {})
    crowd_counts = manifest.get("crowd_counts", {})
    categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "instances": instance_counts.get(str(c["id"]), 0),
            "crowd": crowd_counts.get(str(c["id"]), 0),
        }
        for c in manifest["categories"]
    ]
    on_disk = 0
    for s in manifest["shards"]:
        fs, where = storage.filesystem(str(shard_dir / s["path"]))
        on_disk += max(fs.get_file_info(where).size or 0, 0)
    problems: list[str] = []
    if verify:
        for s in manifest["shards"]:
            problems += verify_shard(shard_dir, s)
        if not sum(int(s["rows"]) for s in manifest["shards"]):
            problems.append("no records: the shard set is empty (see the skipped images)")
    return {
        "dir": str(shard_dir),
        "source": manifest.get("source", {}),
        "format_version": manifest["format_version"],
        "totals": manifest.get("totals", {}),
        "image_size": manifest.get("image_size"),
        "categories": categories,
        "shards": len(manifest["shards"]),
        "bytes_on_disk": on_disk,
        "skipped": manifest["skipped"],
        "skipped_groups": group_skipped(manifest["skipped"]),
        "verified": verify,
        "problems": problems,
    }


def format_inspect(report: dict) -> str:
    """Human-readable text of an `inspect_shards` report.

    Returns:
        Multi-line text.
    """
    t = report["totals"]
    src = report["source"]
    lines = [
        f"{report['dir']}: format_version {report['format_version']}, "
        f"source {src.get('format', '?')} "
        + ", ".join(f"{k}={v}" for k, v in src.items() if k != "format"),
        f"  records: {t.get('records', '?')} of {t.get('images', '?')} images, "
        f"{t.get('instances', '?')} instances, {t.get('crowd', '?')} crowd regions",
        f"  shards: {report['shards']}, {format_bytes(report['bytes_on_disk'])} on disk",
    ]
    size = report["image_size"]
    if size:
        lines.append(
            f"  image size: height {size['min_height']}..{size['max_height']}, "
            f"width {size['min_width']}..{size['max_width']}"
        )
    lines.append(f"  categories ({len(report['categories'])}):")
    for c in report["categories"]:
        lines.append(
            f"    {c['id']:>4}  {c['name']:<40} {c['instances']:>8} inst {c['crowd']:>6} crowd"
        )
    if report["skipped"]:
        lines.append(
            f"  skipped: {t.get('skipped_images', '?')} images, "
            f"{t.get('skipped_annotations', '?')} annotations"
        )
        lines += _format_skipped(report["skipped"], indent="    ")
    else:
        lines.append("  skipped: nothing")
    if report["verified"]:
        if report["problems"]:
            lines.append(f"  verify: FAILED, {len(report['problems'])} problem(s):")
            lines += [f"    {p}" for p in report["problems"]]
        else:
            lines.append(f"  verify: OK, all {report['shards']} shards match sha256 and rows")
    return "\n".join(lines)
