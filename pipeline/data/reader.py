"""Read shard directories with Ray Data for Ray Train workers (the driver side).

`build_train_dataset` / `build_eval_dataset` read the Parquet shards listed in the manifest and
decode (and for training, augment) every record in `map_batches` on CPU workers;
`ReaderDataConfig` splits them over the workers, and `steps_per_epoch` fixes every rank's step
count. On a worker, `batches` turns its split into batches (and explains why the step counts
stay equal across ranks).

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
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
