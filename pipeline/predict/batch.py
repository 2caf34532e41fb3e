"""Offline batch inference with Ray Data: an actor pool of model replicas over many images.

    records / files -> ray.data -> map_batches(PredictActor, ActorPoolStrategy(size=replicas))
                    -> rows (`results.PREDICTION_SCHEMA`) -> Parquet + COCO results JSON

Each replica loads the model once (one per GPU on a cluster, `cpus_per_replica` CPU threads
here) and predicts its batches image by image with the same `predict_item` as the plain loop,
so both give the same detections. The driver streams the rows into the output files and
prints progress and throughput.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy

from pipeline import ray_session
from pipeline.data.manifest import load_manifest, shard_paths
from pipeline.predict.images import Item
from pipeline.predict.predictor import load_predictor
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
        torch.set_num_threads(max(1, threads))
        self.predictor = load_predictor(source, **options)
        self.pictures = Path(pictures) if pictures else None
        if self.pictures is not None:
            self.pictures.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
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
    ids = [pc.max(pq.read_table(p, columns=["image_id"])["image_id"]).as_py() for p in paths]
    return [int(i) for i in ids if i is not None]


def replica_device(device: str, gpus_per_replica: float | None) -> tuple[str, float]:
    """Each replica's device and the GPUs Ray reserves for it.

    Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in an actor that asks for no GPU (its
    `set_visible_accelerator_ids` skips zero GPUs unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1):
    every such replica would see all of its node's GPUs and load the model onto GPU 0. A CUDA
    replica therefore reserves a GPU (1 unless `--gpus-per-replica` says otherwise; 0.5 puts two
    on one GPU), and Ray makes that GPU its only visible one, its `cuda:0`.

    Args:
        device: `--device`: cpu, cuda, cuda:N or auto (cuda if GPUs are reserved, else cpu).
        gpus_per_replica: `--gpus-per-replica`, None if not given.

    Returns:
        (the replicas' device, GPUs per replica)

    Raises:
        ValueError: a device that contradicts the GPUs asked for, or a GPU index, which names
            a GPU of this machine, not of the replica's node.
    """
    gpus = gpus_per_replica
    if gpus is not None and gpus < 0:
        raise ValueError(f"--gpus-per-replica {gpus:g}: must be >= 0")
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    kind, _, index = device.partition(":")
    if kind != "cuda":
        if gpus:
            raise ValueError(
                f"--gpus-per-replica {gpus:g} reserves GPUs that --device {device} does not use: "
                "use --device cuda (or auto)"
            )
        return device, 0.0
    if index:
        raise ValueError(
            f"--device {device}: with --ray each replica sees only the GPU Ray gives it, as "
            "cuda:0; use --device cuda"
        )
    if gpus == 0:
        raise ValueError(
            "--device cuda with --gpus-per-replica 0: every replica would see all of its node's "
            "GPUs and load the model onto the first; reserve one each (--gpus-per-replica 1, "
            "the default) or a share (0.5)"
        )
    return "cuda", 1.0 if gpus is None else gpus


def check_replica_gpus(
    replicas: int, gpus: float, cluster: dict[str, float], autoscaler_max: dict[str, float]
) -> None:
    """Fail now, not wait forever, if the cluster cannot give every replica its GPUs.

    Args:
        replicas: model replicas.
        gpus: GPUs of each replica.
        cluster: the cluster's resources now (`ray.cluster_resources()`).
        autoscaler_max: the most its autoscaler can add up to ({}: a fixed cluster); the
            replicas wait for the nodes it adds.
    """
    per_gpu = int(1 / gpus + 1e-9) if gpus < 1 else 0  # replicas sharing one GPU
    need = math.ceil(replicas / per_gpu) if per_gpu else math.ceil(replicas * gpus - 1e-9)
    have = max(cluster.get("GPU", 0.0), autoscaler_max.get("GPU", 0.0))
    if need > have:
        where = "this autoscaling cluster grows to at most" if autoscaler_max else "the cluster has"
        raise ValueError(
            f"--replicas {replicas} x --gpus-per-replica {gpus:g} need {need} GPUs, "
            f"but {where} {have:g}"
        )


def _connect(replicas: int, cpus_per_replica: float, gpus: float) -> None:
    """Ray, with room for the replicas; GPU replicas are checked against the cluster's GPUs."""
    # A logical CPU beyond the replicas' for the read tasks that feed them.
    ray_session.connect(min_cpus=replicas * cpus_per_replica + 1)
    if gpus:
        check_replica_gpus(
            replicas, gpus, ray.cluster_resources(), ray_session.autoscaler_max_resources()
        )


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
    gpus_per_replica: float | None = None,
    pictures: bool = False,
) -> dict[str, Any]:
    """Batch inference over shard records and image files with a pool of model replicas.

    Args:
        source: the model (checkpoint or MLflow URI), loaded by every replica.
        files, shards: from `images.collect_inputs`.
        out: output folder: predictions/*.parquet, results.json, images.json (and pictures/).
            On a multi-node cluster it must be storage every node sees.
        options: `load_predictor` keyword arguments (device, thresholds, overrides, URI);
            the device is each replica's (`replica_device`).
        categories: dataset category id -> name, for images.json.
        total: number of images, for the progress lines.
        replicas: model replicas (actors) in the pool.
        batch_size: images per `map_batches` batch.
        cpus_per_replica: CPUs reserved by (and torch threads of) each replica.
        gpus_per_replica: GPUs of each replica; None: 1 on CUDA, else 0 (`replica_device`).
        pictures: draw each image's detections into out/pictures.

    Returns:
        The `ResultWriter.close` summary plus "replicas".
    """
    device, gpus = replica_device(options.get("device", "auto"), gpus_per_replica)
    options = {**options, "device": device}
    _connect(replicas, cpus_per_replica, gpus)
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
        num_gpus=gpus,
    )
    summary = _write(predicted, out, categories, total)
    summary["replicas"] = replicas
    return summary


def _write(predicted: Any, out: Path, categories: dict[int, str], total: int) -> dict[str, Any]:
    """The replicas' rows into results.json, images.json and Parquet, as they stream in."""
    writer = ResultWriter(out, categories, total, parquet=True)
    for batch in predicted.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.add(batch.to_pylist())
    return writer.close()
