"""Read shard directories with Ray Data into Ray Train workers.

Driver side: `build_train_dataset` / `build_eval_dataset` read the Parquet shards listed in the
manifest and decode (and for training, augment) every record in `map_batches` on CPU workers.
Worker side: `iter_train_batches` / `iter_eval_batches` turn a `ray.train.get_dataset_shard`
iterator into `(list[Tensor], list[dict])` batches in torchvision's detection format.

Equal steps (DDP safety). Under Ray Train the default `DataConfig` gives every worker a
`streaming_split(world_size, equal=True)` iterator: each rank receives exactly
floor(rows / world_size) rows. With `steps = steps_per_epoch(manifest, global_batch_size)` =
rows // (world_size * local_batch_size), every rank has at least steps * local_batch_size rows,
and `iter_train_batches` yields exactly `steps` batches of exactly `local_batch_size` samples:
it takes `local_batch_size` rows per step whether or not they are valid, and fills the slot of a
corrupt row with a repeat of a valid sample of the same batch (or of the previous batch). Corrupt
rows are never dropped inside Ray Data, so they cannot make one rank's split shorter. Should an
iterator still run dry (a custom split), the missing samples are repeats too, with a warning.

Eval coverage. Eval datasets are split with `streaming_split(world_size, equal=False)`, which
hands every block to exactly one rank and drops nothing; `ReaderDataConfig` does that for the
datasets named as eval and keeps the default (equal=True) for the rest. Ranks then see different
numbers of eval batches: the eval loop must not run a collective per batch (gather once at the
end). A corrupt eval record is skipped and counted (no prediction for it).

Shuffling. Files are shuffled per epoch with a seed derived from (seed, epoch); augmentation
draws come from a generator per record seeded by (seed, epoch, image_id), so a run is
reproducible whatever Ray Data's block and batch boundaries. If one Dataset object is executed
several times (Ray Train keeps the dataset it was given and re-executes it every epoch), the
effective epoch is `epoch + execution index` of that Dataset, so each pass is shuffled and
augmented anew, and `build_train_dataset(epoch=k)` reproduces the k-th pass of `epoch=0`.
Which records a rank gets, and in which order, also depends on which decode task finishes
first, unless the datasets run with Ray Data's `preserve_order` (`ReaderDataConfig`,
`data.preserve_order`): then a rank's stream is the same on every run.

Pass start-up. Every epoch and every evaluation is a new execution, so what an execution
starts with is paid each time: the Parquet files are read with Ray Data's V1 reader
(`_read_parquet`), and `concurrency` caps the decode tasks, because each task beyond Ray's
soft limit of worker processes (one per logical CPU) runs in a process started for it (~2 s of
imports) and killed when idle, every pass (docs/design.md, "Epoch restarts").
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.data
from ray.data import DataContext, FileShuffleConfig, TaskPoolStrategy
from ray.train import DataConfig

from pipeline.data.augment import AugmentConfig, augment_table, decode_eval_table
from pipeline.data.manifest import load_manifest, shard_paths

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import Dataset
    from torch import Tensor

logger = logging.getLogger(__name__)

# Records per map_batches call: small enough that blocks of decoded images stay a few MB and
# stream to the trainer early, large enough to amortize the per-call overhead.
TRAIN_MAP_BATCH = 16
EVAL_MAP_BATCH = 8
# Columns the eval pass needs: skipping `annotations` saves reading every RLE.
_EVAL_COLUMNS = ["image_id", "file_name", "height", "width", "image"]


# ---------------------------------------------------------------------------------------------
# Manifest helpers


def _load(shard_dir: str) -> tuple[dict, list[str]]:
    manifest = load_manifest(shard_dir)
    return manifest, shard_paths(manifest, shard_dir)


def label_map(manifest: Mapping[str, Any]) -> dict[int, int]:
    """Dataset category id -> contiguous training label 1..C, in manifest category order.

    Label 0 is torchvision's background.
    """
    return {int(c["id"]): i + 1 for i, c in enumerate(manifest["categories"])}


def inverse_label_map(manifest: Mapping[str, Any]) -> dict[int, int]:
    """Contiguous label 1..C -> dataset category id, to write COCO results for evaluation."""
    return {label: cat for cat, label in label_map(manifest).items()}


def num_rows(manifest: Mapping[str, Any]) -> int:
    """Records in the shard directory, from the manifest (no file is opened)."""
    return sum(int(s["rows"]) for s in manifest["shards"])


def steps_per_epoch(manifest: Mapping[str, Any], global_batch_size: int) -> int:
    """Optimizer steps per epoch, the same on every rank.

    Args:
        manifest: from `manifest.load_manifest`.
        global_batch_size: world_size * local_batch_size.

    Returns:
        rows // global_batch_size (the remainder is left for the next epoch's shuffle).

    Raises:
        ValueError: fewer rows than one global batch.
    """
    rows = num_rows(manifest)
    steps = rows // global_batch_size
    if steps < 1:
        raise ValueError(
            f"{rows} records are fewer than one global batch of {global_batch_size}; "
            "lower the batch size or the number of workers"
        )
    return steps


# ---------------------------------------------------------------------------------------------
# Datasets (driver side)


def _mix(*parts: int) -> int:
    """A 32-bit seed from integers; stable across processes (unlike `hash` of a str)."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1)[0])


@dataclass
class _EpochFileShuffle(FileShuffleConfig):
    """File order seeded by (seed, epoch + execution index) of the Dataset."""

    epoch: int = 0

    def get_seed(self, execution_idx: int = 0) -> int | None:
        assert self.seed is not None
        return _mix(self.seed, self.epoch + execution_idx)


def _execution_epoch(epoch: int) -> int:
    # Ray Data hands each task the Dataset's DataContext, whose (private) execution index
    # counts finished executions; without it every re-execution would repeat the same draws.
    return epoch + int(getattr(DataContext.get_current(), "_execution_idx", 0))


def _read_parquet(paths: list[str], **kwargs: Any) -> Dataset:
    """`ray.data.read_parquet` through Ray Data's V1 file reader.

    Ray 2.60's default (DataSourceV2) lists the files in one task on every execution: 6-8 s
    before the first row of each epoch and each evaluation pass, against 0.2 s for V1 on the
    same 10 shards (docs/design.md, "Epoch restarts"). V1 also reads the files in parallel tasks.
    """
    ctx = DataContext.get_current()
    default, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = default


def _small_blocks(ds: Dataset, rows: int) -> Dataset:
    # Ray Data sizes read blocks by bytes, and encoded images are small: a whole shard (or,
    # with the file-based reader, every shard of a small data set) would land in one block and
    # be decoded by one task on one CPU. Streaming repartition (no shuffle, order kept) cuts
    # blocks of `rows` records, so decode spreads over every CPU Ray Data has.
    return ds.repartition(target_num_rows_per_block=rows)


def _augment_batch(
    table: pa.Table, aug: AugmentConfig, seed: int, epoch: int, labels: dict[int, int]
) -> pa.Table:
    return augment_table(table, aug, seed, _execution_epoch(epoch), labels)


def build_train_dataset(
    shard_dir: str,
    aug: AugmentConfig,
    epoch: int = 0,
    seed: int | None = None,
    *,
    num_cpus: float | None = None,
    concurrency: int | None = None,
) -> Dataset:
    """The training dataset: shuffled files, decoded and augmented records.

    Args:
        shard_dir: a shard directory (manifest.json + Parquet shards).
        aug: augmentation config.
        epoch: the epoch this dataset is for (see the module docstring on re-execution).
        seed: run seed for file order and augmentation; None uses `aug.seed`.
        num_cpus: CPUs per decode task (fractions allowed), None for Ray Data's default of 1.
        concurrency: most decode tasks at a time, None for as many as the CPUs allow (see
            the module docstring on worker start-up).

    Returns:
        A lazy Dataset of `augment.TRAIN_SAMPLE_SCHEMA` rows, corrupt records included as
        `valid=False` rows.

    Raises:
        ValueError: the manifest is missing, of another format_version, or a shard's schema
            does not match (from `manifest.load_manifest`), before any Ray work.
    """
    manifest, paths = _load(shard_dir)
    seed = aug.seed if seed is None else seed
    ds = _read_parquet(paths, shuffle=_EpochFileShuffle(seed=seed, epoch=epoch))
    fn = partial(_augment_batch, aug=aug, seed=seed, epoch=epoch, labels=label_map(manifest))
    return _small_blocks(ds, TRAIN_MAP_BATCH).map_batches(
        fn,
        batch_format="pyarrow",
        batch_size=TRAIN_MAP_BATCH,
        num_cpus=num_cpus,
        compute=TaskPoolStrategy(size=concurrency),  # `concurrency=` is deprecated
    )


def build_eval_dataset(
    shard_dir: str, *, num_cpus: float | None = None, concurrency: int | None = None
) -> Dataset:
    """The evaluation dataset: every record decoded at its original size, in file order.

    Args:
        shard_dir: a shard directory.
        num_cpus: CPUs per decode task, None for Ray Data's default of 1.
        concurrency: most decode tasks at a time, None for as many as the CPUs allow.

    Returns:
        A lazy Dataset of `augment.EVAL_SAMPLE_SCHEMA` rows.

    Raises:
        ValueError: as `build_train_dataset`.
    """
    _, paths = _load(shard_dir)
    ds = _read_parquet(paths, columns=_EVAL_COLUMNS)
    return _small_blocks(ds, EVAL_MAP_BATCH).map_batches(
        decode_eval_table,
        batch_format="pyarrow",
        batch_size=EVAL_MAP_BATCH,
        num_cpus=num_cpus,
        compute=TaskPoolStrategy(size=concurrency),  # `concurrency=` is deprecated
    )


class ReaderDataConfig(DataConfig):
    """`DataConfig` that splits eval datasets without dropping rows, optionally in order.

    Ray Train's default splits every dataset with `streaming_split(n, equal=True)`, which drops
    up to n - 1 rows: right for training (equal steps), wrong for evaluation. Datasets named in
    `eval_datasets` get `streaming_split(n, equal=False)` instead: every row reaches exactly one
    worker. Pass it as `TorchTrainer(..., dataset_config=ReaderDataConfig())`.

    With `preserve_order`, every dataset runs with Ray Data's `preserve_order`: blocks leave
    each operator in input order whichever task finishes first, and the splitter hands them to
    ranks by that order alone (locality hints are ignored), so each rank receives the same
    records in the same order on every run with the same seed (module docstring, "Shuffling").
    """

    def __init__(
        self,
        eval_datasets: Sequence[str] = ("eval",),
        *,
        preserve_order: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            eval_datasets: names (keys of the trainer's `datasets`) split with equal=False.
            preserve_order: run every dataset in order (reproducible per-rank streams); ignored
                if `execution_options` is given.
            **kwargs: `DataConfig` arguments.
        """
        if preserve_order and kwargs.get("execution_options") is None:
            options = DataConfig.default_ingest_options()
            options.preserve_order = True
            kwargs["execution_options"] = options
        super().__init__(**kwargs)
        self._eval_datasets = frozenset(eval_datasets)

    def configure(
        self,
        datasets: dict[str, Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        to_split = self._datasets_to_split
        unequal = {
            name: ds
            for name, ds in datasets.items()
            if name in self._eval_datasets and (to_split == "all" or name in to_split)
        }
        rest = {name: ds for name, ds in datasets.items() if name not in unequal}
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        if rest:
            parts = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            for out, part in zip(output, parts):
                out.update(part)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in unequal.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            splits = ds.streaming_split(world_size, equal=False, locality_hints=hints)
            for out, split in zip(output, splits):
                out[name] = split
        return output


# ---------------------------------------------------------------------------------------------
# Iteration (worker side)


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
        data_iterator: `ray.train.get_dataset_shard(...)` of a `build_train_dataset` dataset.
        local_batch_size: samples per batch on this worker.
        steps: batches to yield, from `steps_per_epoch` (the same on every rank).
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
    # Imported here: Ray Data workers import this module for `_augment_batch` and need no torch.
    import torch

    from pipeline.data.collate import collate_train

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
    warned_short = False
    try:
        step = 0
        while step < steps:
            window = min(group_window, steps - step)
            chunk = list(islice(rows, window * local_batch_size))
            if len(chunk) < window * local_batch_size and not warned_short:
                warned_short = True
                logger.warning(
                    "data iterator ran out at step %d of %d; repeating samples to keep the step "
                    "count equal across ranks",
                    step + len(chunk) // local_batch_size,
                    steps,
                )
            if window == 1:
                groups = [[r for r in chunk if stats._saw(r)]]
            else:
                groups = group_by_shape([r for r in chunk if stats._saw(r)], local_batch_size)
                groups = [groups[i] for i in rng.permutation(len(groups))]
            groups += [[] for _ in range(window - len(groups))]
            for valid in groups:
                pool = valid or previous
                if not pool:
                    # Nothing valid yet on this rank: borrow the next valid row of the stream.
                    pool = list(_first_valid(rows, stats))
                    if not pool:
                        raise RuntimeError(
                            "no valid training record reached this worker; all were corrupt"
                        )
                fill = [pool[i % len(pool)] for i in range(local_batch_size - len(valid))]
                stats.filled += len(fill)
                stats.samples += local_batch_size
                previous = pool
                step += 1
                yield collate_train(valid + fill, image_dtype)
    finally:
        rows.close()  # stop Ray's prefetching for this epoch


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

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for images, targets in batches:
                if pin_memory:
                    images = [i.pin_memory() for i in images]
                    targets = [{k: v.pin_memory() for k, v in t.items()} for t in targets]
                if not put((images, targets)):
                    return
            put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(err)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
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
        data_iterator: `ray.train.get_dataset_shard(...)` of a `build_eval_dataset` dataset,
            split with equal=False (`ReaderDataConfig`).
        batch_size: images per batch.
        stats: counters to update; a fresh `ReaderStats` if None.
        prefetch_batches: Ray Data batches to prefetch.

    Yields:
        (images, targets): float32 (3, H, W) images at original size in [0, 1] and targets
        {"image_id": () int64, "orig_size": (2,) int64 [H, W]}.
    """
    # Imported here, as in `iter_train_batches`: Ray Data workers need no torch.
    from pipeline.data.collate import collate_eval

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
