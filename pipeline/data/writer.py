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

import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from pipeline import storage
from pipeline.data.inspect import format_summary
from pipeline.data.layout import DEFAULT_SHARD_SIZE, PROGRESS_DIR, RUN_FILE
from pipeline.data.manifest import DataError, build_manifest, sha256_file
from pipeline.data.plan import (
    BadRecordError,
    ConversionPlan,
    fingerprint,
)
from pipeline.data.progress import Progress
from pipeline.data.records import FORMAT_VERSION, MANIFEST_NAME
from pipeline.data.shard_task import (
    ShardTask,
    atomic_write_json,
    init_worker,
    marker_path,
    shard_name,
    write_shard,
)

POLL_SECONDS = 0.5  # how often the parent wakes up to refresh the progress line


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


def _reusable_markers(out: Path, n_shards: int, run_id: str) -> dict[int, dict]:
    """{k: done marker} of the shards a resumed run keeps: complete and intact."""
    markers = {k: _finished_marker(out, k, run_id) for k in range(n_shards)}
    return {k: m for k, m in markers.items() if m is not None}


def _finished_marker(out: Path, index: int, run_id: str) -> dict | None:
    """The done marker of shard `index` if the shard is complete and intact, else None."""
    marker = _read_json(marker_path(out, index))
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
    options: dict[str, Any] = {
        "shard_size": shard_size,
        "workers": workers,
        "strict": strict,
        "resume": resume,
        "progress": progress,
        "stream": stream,
        "on_shard_done": on_shard_done,
    }
    if storage.is_uri(out):
        return _write_to_object_storage(plan, str(out), **options)
    return _write_local(plan, Path(out), **options)


def _write_local(
    plan: ConversionPlan,
    out: Path,
    *,
    shard_size: int,
    workers: int,
    strict: bool,
    resume: bool,
    progress: bool,
    stream: TextIO | None,
    on_shard_done: Callable[[int], None] | None,
) -> dict:
    """`write_shards` into a local directory, its arguments checked."""
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

    markers = _reusable_markers(out, n_shards, run_id) if resume else {}
    todo = _clear_todo(out, n_shards, markers)
    reused = len(markers)
    prog = Progress(
        n_items,
        label=f"convert {plan.name}",
        initial=sum(m["items"] for m in markers.values()),
        stream=stream,
        enabled=progress,
    )
    task = partial(_shard_task, plan, out, shard_size, strict, run_id)
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


def _clear_todo(out: Path, n_shards: int, markers: dict[int, dict]) -> list[int]:
    """The shards to write (those without a kept marker), their old files removed."""
    todo = [k for k in range(n_shards) if k not in markers]
    for k in todo:  # a half-finished or stale shard k must not survive next to the new one
        (out / shard_name(k)).unlink(missing_ok=True)
        marker_path(out, k).unlink(missing_ok=True)
    return todo


def _shard_task(
    plan: ConversionPlan, out: Path, shard_size: int, strict: bool, run_id: str, k: int
) -> ShardTask:
    """The task of writing shard `k` of `plan`."""
    return ShardTask(
        out=str(out),
        index=k,
        items=list(plan.items[k * shard_size : (k + 1) * shard_size]),
        convert_item=plan.convert_item,
        item_source=plan.item_source,
        context=plan.context,
        strict=strict,
        run_id=run_id,
    )


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
    task: Callable[[int], ShardTask],
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
        markers[k] = write_shard(task(k), on_item)
        if on_shard_done is not None:
            on_shard_done(k)


def _run_pool(
    todo: list[int],
    task: Callable[[int], ShardTask],
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
        max_workers=n_workers, mp_context=ctx, initializer=init_worker, initargs=(counter,)
    ) as pool:
        try:
            while True:
                # Bounded in-flight work: a few shard tasks queued per worker, never all of them.
                while len(running) < 2 * n_workers:
                    k = next(pending, None)
                    if k is None:
                        break
                    running[pool.submit(write_shard, task(k))] = k
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
