"""Offline batch inference with Ray Data: an actor pool of model replicas over many images.

    records / files -> ray.data -> map_batches(PredictActor, ActorPoolStrategy(size=replicas))
                    -> rows (`results.PREDICTION_SCHEMA`) -> Parquet + COCO results JSON

Each replica loads the model once (one per GPU on a cluster, `cpus_per_replica` CPU threads
here) and predicts its batches image by image with the same `predict_item` as the plain loop,
so both give the same detections. The driver streams the rows into the output files and
prints progress and throughput.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.data.manifest import load_manifest, shard_paths
from pipeline.predict.results import PREDICTION_SCHEMA, ResultWriter, predict_item

ITEM_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("path", pa.string()),
        ("image", pa.binary()),
    ]
)


class PredictActor:
    """A model replica: `map_batches` calls it with batches of `ITEM_SCHEMA` rows."""

    def __init__(
        self, source: str, options: dict[str, Any], threads: int, pictures: str = ""
    ) -> None:
        import torch

        from pipeline.predict.predictor import load_predictor

        torch.set_num_threads(max(1, threads))
        self.predictor = load_predictor(source, **options)
        self.pictures = Path(pictures) if pictures else None
        if self.pictures is not None:
            self.pictures.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.predict.images import Item

        rows = [
            predict_item(
                self.predictor,
                Item(int(r["image_id"]), r["file_name"], r["path"] or "", r["image"] or b""),
                self.pictures,
            )
            for r in batch.to_pylist()
        ]
        return pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)


def build_dataset(files: list[str], shards: list[str], batch_size: int) -> Any:
    """One Ray dataset of `ITEM_SCHEMA` rows: shard records (bytes) and files (paths).

    A shard file reads as one block; the dataset is split into blocks of `batch_size` rows
    (streaming, no shuffle) so every replica gets work and results reach the writer as they
    come, not all at the end.
    """
    import ray.data

    parts = []
    last_id = 0
    for shard_dir in shards:
        manifest = load_manifest(shard_dir)
        paths = [str(p) for p in shard_paths(manifest, shard_dir)]
        ds = ray.data.read_parquet(paths, columns=["image_id", "file_name", "image"])
        parts.append(ds.map_batches(_with_path, batch_format="pyarrow"))
        last_id = max([last_id, *_max_ids(paths)])
    if files:
        items = [
            {"image_id": last_id + i, "file_name": f, "path": f, "image": b""}
            for i, f in enumerate(files, start=1)
        ]
        parts.append(ray.data.from_arrow(pa.Table.from_pylist(items, schema=ITEM_SCHEMA)))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds.repartition(target_num_rows_per_block=batch_size)


def _with_path(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table(
        {
            "image_id": batch["image_id"].cast(pa.int64()),
            "file_name": batch["file_name"],
            "path": pa.array([""] * n, pa.string()),
            "image": batch["image"].cast(pa.binary()),
        },
        schema=ITEM_SCHEMA,
    )


def _max_ids(paths: list[str]) -> list[int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = [pc.max(pq.read_table(p, columns=["image_id"])["image_id"]).as_py() for p in paths]
    return [int(i) for i in ids if i is not None]


def connect(num_cpus: float) -> None:
    """Join RAY_ADDRESS, or start a local instance with at least `num_cpus` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=int(max(os.cpu_count() or 1, num_cpus) + 0.999))


def predict_with_ray(
    source: str,
    files: list[str],
    shards: list[str],
    out: Path,
    *,
    options: dict[str, Any],
    categories: dict[int, str],
    total: int,
    replicas: int = 1,
    batch_size: int = 16,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    pictures: bool = False,
) -> dict[str, Any]:
    """Batch inference over shard records and image files with a pool of model replicas.

    Args:
        source: the model (checkpoint or MLflow URI), loaded by every replica.
        files, shards: from `images.collect_inputs`.
        out: output folder: predictions/*.parquet, results.json, images.json (and pictures/).
            On a multi-node cluster it must be storage every node sees.
        options: `load_predictor` keyword arguments (device, thresholds, overrides, URI).
        categories: dataset category id -> name, for images.json.
        total: number of images, for the progress lines.
        replicas: model replicas (actors) in the pool.
        batch_size: images per `map_batches` batch.
        cpus_per_replica: CPUs reserved by (and torch threads of) each replica.
        gpus_per_replica: GPUs of each replica (1 on a GPU cluster).
        pictures: draw each image's detections into out/pictures.

    Returns:
        The `ResultWriter.close` summary plus "replicas".
    """
    from ray.data import ActorPoolStrategy

    connect(replicas * cpus_per_replica + 1)
    ds = build_dataset(files, shards, batch_size)
    predicted = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={
            "source": source,
            "options": options,
            "threads": int(cpus_per_replica),
            "pictures": str(Path(out).resolve() / "pictures") if pictures else "",
        },
        compute=ActorPoolStrategy(size=replicas),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=cpus_per_replica,
        num_gpus=gpus_per_replica,
    )
    writer = ResultWriter(out, categories, total, parquet=True)
    for batch in predicted.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.add(batch.to_pylist())
    summary = writer.close()
    summary["replicas"] = replicas
    return summary
