"""Training and evaluation batches on a Ray Train worker, from its split of a `reader` dataset.

`iter_train_batches` / `iter_eval_batches` turn a `ray.train.get_dataset_shard` iterator into
`(list[Tensor], list[dict])` batches in torchvision's detection format; `in_background` builds
them in a thread, ahead of the training step.

Equal steps (DDP safety). Under Ray Train the default `DataConfig` gives every worker a
`streaming_split(world_size, equal=True)` iterator: each rank receives exactly
floor(rows / world_size) rows. With `steps = reader.steps_per_epoch(manifest, global_batch_size)`
= rows // (world_size * local_batch_size), every rank has at least steps * local_batch_size
rows, and `iter_train_batches` yields exactly `steps` batches of exactly `local_batch_size`
samples: it takes `local_batch_size` rows per step whether or not they are valid, and fills the
slot of a corrupt row with a repeat of a valid sample of the same batch (or of the previous
batch). Corrupt rows are never dropped inside Ray Data, so they cannot make one rank's split
shorter. Should an iterator still run dry (a custom split), the missing samples are repeats
too, with a warning.

Eval batches differ in number across ranks (`reader`'s docstring, "Eval coverage"); a corrupt
eval record is skipped and counted (no prediction for it).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.collate import collate_eval, collate_train

logger = logging.getLogger(__name__)


@dataclass
class ReaderStats:
    """What one worker's reader met, to log from the training loop (sum across ranks)."""

    samples: int = 0  # samples yielded, repeats included
    skipped_corrupt: int = 0  # corrupt records skipped (bad image bytes, bad RLE, ...)
    dropped_degenerate: int = 0  # instances dropped because their mask became empty
    crowd_excluded: int = 0  # crowd annotations left out of training targets
    filled: int = 0  # batch slots filled with a repeat of a valid sample

    def as_dict(self) -> dict[str, int]:
        """The counters as a flat dict, e.g. for `mlflow.log_metrics`."""
        return asdict(self)

    def _saw(self, row: Mapping[str, Any]) -> bool:
        """Count one row; False (and a warning) if it is corrupt."""
        if not row["valid"]:
            self.skipped_corrupt += 1
            logger.warning(
                "skipping corrupt record image_id=%s file_name=%s: %s",
                row["image_id"],
                row["file_name"],
                row["reason"],
            )
            return False
        self.dropped_degenerate += int(row.get("degenerate_dropped") or 0)
        self.crowd_excluded += int(row.get("crowd_excluded") or 0)
        return True


def _rows(
    data_iterator: Any, batch_size: int, prefetch_batches: int
) -> Generator[dict[str, Any], None, None]:
    """Rows of a Ray DataIterator (or Dataset) as dicts, fetched `batch_size` at a time."""
    for table in data_iterator.iter_batches(
        batch_size=batch_size, batch_format="pyarrow", prefetch_batches=prefetch_batches
    ):
        yield from table.to_pylist()


def iter_train_batches(
    data_iterator: Any,
    local_batch_size: int,
    steps: int,
    stats: ReaderStats | None = None,
    *,
    prefetch_batches: int = 1,
    group_window: int = 1,
    seed: int | Sequence[int] = 0,
    image_dtype: Any = None,
) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Exactly `steps` training batches of exactly `local_batch_size` samples.

    Rows are read `group_window` steps' worth at a time (`group_window * local_batch_size`
    rows). With `group_window > 1` the valid rows of such a window are regrouped into batches
    of one orientation (landscape or portrait) and similar size, and those batches come out in
    a seeded random order: a batch is padded to its largest image, so grouping cuts the
    padding (Detectron's aspect-ratio grouping, plus size). A corrupt row's slot is filled with
    a repeat of a valid row of the same batch, else of the previous batch, else of the next
    valid row of the stream; if the stream ends early, the missing slots are repeats too.
    Rows beyond `steps * local_batch_size` are not read.

    Args:
        data_iterator: `ray.train.get_dataset_shard(...)` of a `reader.build_train_dataset`
            dataset.
        local_batch_size: samples per batch on this worker.
        steps: batches to yield, from `reader.steps_per_epoch` (the same on every rank).
        stats: counters to update; a fresh `ReaderStats` if None.
        prefetch_batches: Ray Data batches to prefetch.
        group_window: steps whose rows are regrouped together; 1 keeps the stream's batches.
        seed: seeds the order of the regrouped batches, e.g. (run seed, epoch, rank).
        image_dtype: torch.float32 (None) or torch.uint8, as for `collate.image_tensor`.

    Yields:
        (images, targets): `local_batch_size` (3, H_i, W_i) images, float32 in [0, 1] (or
        uint8) and targets {"boxes": (N, 4) float32 x1y1x2y2, "labels": (N,) int64,
        "masks": (N, H_i, W_i) uint8, "image_id": () int64}.

    Raises:
        RuntimeError: the worker's whole stream held no valid record.
    """
    image_dtype = torch.float32 if image_dtype is None else image_dtype
    if local_batch_size < 1 or steps < 0 or group_window < 1:
        raise ValueError(
            "need local_batch_size >= 1, steps >= 0 and group_window >= 1, got "
            f"{local_batch_size}, {steps}, {group_window}"
        )
    stats = stats if stats is not None else ReaderStats()
    rng = np.random.default_rng(seed)
    rows = _rows(data_iterator, local_batch_size, prefetch_batches)
    previous: list[dict[str, Any]] = []  # valid rows of the last batch: fill-in of last resort
    try:
        for window, chunk in _windows(rows, steps, group_window, local_batch_size):
            for valid in _window_batches(chunk, window, local_batch_size, stats, rng):
                batch, previous = _filled(valid, previous, rows, local_batch_size, stats)
                yield collate_train(batch, image_dtype)
    finally:
        rows.close()  # stop Ray's prefetching for this epoch


def _windows(
    rows: Iterator[dict[str, Any]], steps: int, group_window: int, batch_size: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(window, chunk): the rows of `window` steps at a time, `steps` steps in all.

    A chunk may be short (the stream ran out); the first short one is warned about.
    """
    warned_short = False
    step = 0
    while step < steps:
        window = min(group_window, steps - step)
        chunk = list(islice(rows, window * batch_size))
        if len(chunk) < window * batch_size and not warned_short:
            warned_short = True
            logger.warning(
                "data iterator ran out at step %d of %d; repeating samples to keep the step "
                "count equal across ranks",
                step + len(chunk) // batch_size,
                steps,
            )
        yield window, chunk
        step += window


def _window_batches(
    chunk: list[dict[str, Any]],
    window: int,
    batch_size: int,
    stats: ReaderStats,
    rng: np.random.Generator,
) -> list[list[dict[str, Any]]]:
    """The valid rows of one window's `chunk` as `window` batches, some short or empty.

    With `window` 1 the batch is the stream's; else the rows are grouped by shape and the
    groups come in a seeded order.
    """
    valid = [r for r in chunk if stats._saw(r)]
    if window == 1:
        groups = [valid]
    else:
        groups = group_by_shape(valid, batch_size)
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return groups + [[] for _ in range(window - len(groups))]


def _filled(
    valid: list[dict[str, Any]],
    previous: list[dict[str, Any]],
    rows: Iterator[dict[str, Any]],
    batch_size: int,
    stats: ReaderStats,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`valid` filled up to `batch_size` rows with repeats.

    The repeats come from `valid`, else from `previous` (the last batch's pool), else from the
    next valid row of `rows`.

    Returns:
        (the batch's rows, the pool its repeats came from: the next batch's `previous`).

    Raises:
        RuntimeError: no valid row to repeat, in the whole stream.
    """
    pool = valid or previous
    if not pool:
        # Nothing valid yet on this rank: borrow the next valid row of the stream.
        pool = list(_first_valid(rows, stats))
        if not pool:
            raise RuntimeError("no valid training record reached this worker; all were corrupt")
    fill = [pool[i % len(pool)] for i in range(batch_size - len(valid))]
    stats.filled += len(fill)
    stats.samples += batch_size
    return valid + fill, pool


def in_background(
    batches: Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]],
    depth: int = 2,
    pin_memory: bool = False,
) -> Generator[tuple[list[Tensor], list[dict[str, Tensor]]], None, None]:
    """`batches`, built in a background thread up to `depth` batches ahead of the consumer.

    The thread runs the whole batch preparation (reading rows, decoding masks, collating and,
    with `pin_memory`, copying into page-locked memory for asynchronous GPU copies), so the
    training step does not wait for it. Batches come out in the order `batches` yields them.
    An exception in the thread is raised in the consumer; closing this generator (or leaving
    its loop) stops the thread and closes `batches`.

    Args:
        batches: e.g. `iter_train_batches(...)`; consumed only by the background thread.
        depth: batches kept ready (the queue's bound).
        pin_memory: pin every tensor of a batch (only useful with CUDA).

    Yields:
        The batches of `batches`.
    """
    if depth < 1:
        raise ValueError(f"need depth >= 1, got {depth}")
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()
    thread = threading.Thread(
        target=_produce,
        args=(batches, ready, stop, done, pin_memory),
        name="batch-prefetch",
        daemon=True,
    )
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _produce(
    batches: Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]],
    ready: queue.Queue[Any],
    stop: threading.Event,
    done: object,
    pin_memory: bool,
) -> None:
    """`in_background`'s thread: every batch (pinned) into `ready`, then `done` or the error."""
    try:
        for images, targets in batches:
            if pin_memory:
                images = [i.pin_memory() for i in images]
                targets = [{k: v.pin_memory() for k, v in t.items()} for t in targets]
            if not _put(ready, stop, (images, targets)):
                return
        _put(ready, stop, done)
    except BaseException as err:  # noqa: BLE001 - handed to the consumer
        _put(ready, stop, err)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _put(ready: queue.Queue[Any], stop: threading.Event, item: Any) -> bool:
    """Put `item` into `ready` unless `stop` is set first (the consumer left); False if so."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def group_by_shape(rows: list[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """Rows split into batches of `batch_size` (the last may be short) that pad little.

    Landscape rows come before portrait ones, each ordered by area, and consecutive rows form a
    batch: its images share an orientation and have similar sizes.
    """

    def key(r: dict[str, Any]) -> tuple[bool, int]:
        h, w = int(r["height"]), int(r["width"])
        return h > w, h * w

    ordered = sorted(rows, key=key)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def _first_valid(rows: Iterator[dict[str, Any]], stats: ReaderStats) -> Iterator[dict[str, Any]]:
    for r in rows:
        if stats._saw(r):
            yield r
            return


def iter_eval_batches(
    data_iterator: Any,
    batch_size: int,
    stats: ReaderStats | None = None,
    *,
    prefetch_batches: int = 1,
) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Evaluation batches over every valid record of this worker's split, each once.

    The number of batches differs across ranks (see the module docstring); the last batch may
    be smaller. Corrupt records are skipped with a warning and counted.

    Args:
        data_iterator: `ray.train.get_dataset_shard(...)` of a `reader.build_eval_dataset`
            dataset, split with equal=False (`reader.ReaderDataConfig`).
        batch_size: images per batch.
        stats: counters to update; a fresh `ReaderStats` if None.
        prefetch_batches: Ray Data batches to prefetch.

    Yields:
        (images, targets): float32 (3, H, W) images at original size in [0, 1] and targets
        {"image_id": () int64, "orig_size": (2,) int64 [H, W]}.
    """
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    stats = stats if stats is not None else ReaderStats()
    batch: list[dict[str, Any]] = []
    for row in _rows(data_iterator, batch_size, prefetch_batches):
        if not stats._saw(row):
            continue
        batch.append(row)
        if len(batch) == batch_size:
            stats.samples += len(batch)
            yield collate_eval(batch)
            batch = []
    if batch:
        stats.samples += len(batch)
        yield collate_eval(batch)
