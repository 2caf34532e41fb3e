"""Writing a shard directory: converted records to Parquet shards, resumable, then the manifest.

A shard directory OUT holds:

    OUT/shard-00000.parquet ...       rows of `records.RECORD_SCHEMA`; shard k holds the records
                                      of input items [k * shard_size, (k + 1) * shard_size)
    OUT/_progress/run.json            what is being converted (input fingerprint, shard size):
                                      `--resume` refuses to mix two different conversions
    OUT/_progress/shard-00000.json    done marker of shard k: rows, sha256, stats, skipped records
    OUT/manifest.json                 written last and atomically: its presence means "complete"

Files starting with "_" or "." are ignored by pyarrow's and Ray Data's directory discovery, so the
markers and temp files never show up as data. `write_shards` takes a converter's
`plan.ConversionPlan` and does the rest: process pool, bounded in-flight work, atomic shard
writes, resume, progress and the manifest.
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.inspect import format_summary
from pipeline.data.layout import DEFAULT_SHARD_SIZE, PROGRESS_DIR, RUN_FILE
from pipeline.data.manifest import DataError, build_manifest, sha256_file
from pipeline.data.plan import (
    BadRecordError,
    ConversionPlan,
    ItemResult,
    fingerprint,
    skip_entry,
)
from pipeline.data.progress import Progress
from pipeline.data.records import FORMAT_VERSION, MANIFEST_NAME, RECORD_SCHEMA

ROW_GROUP_ROWS = 32  # rows buffered before a Parquet row group is written: bounds worker memory

POLL_SECONDS = 0.5  # how often the parent wakes up to refresh the progress line


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

    manifest = build_manifest(
        run,
        [markers[k] for k in range(n_shards)],
        source=plan.source,
        categories=plan.categories,
        pre_skipped=plan.pre_skipped,
    )
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
