"""The eval job of `panet eval`: a checkpoint scored on a shard directory by Ray Train workers.

    pick_checkpoint(path, best)      -> the checkpoint of a job directory (latest or best)
    run_eval_job(checkpoint, data)   -> the 12 COCO metrics (driver: checks, Ray, the workers)
    eval_worker(config)              -> what each Ray Train worker runs

Each worker predicts its share of the shards (each image once, `streaming_split(equal=False)`)
and `distributed.evaluate` scores them on rank 0. The metrics, or a worker's setup error, come
back through a Ray actor (`failures.ResultBox`), not a file: rank 0 may run on another node
than the driver.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from panet_model import build_panet
from pipeline import ray_session, storage
from pipeline.config import decode_options
from pipeline.data.batches import iter_eval_batches
from pipeline.data.manifest import load_manifest
from pipeline.data.reader import ReaderDataConfig, build_eval_dataset, inverse_label_map
from pipeline.evaluate.distributed import evaluate
from pipeline.evaluate.scoring import coco_ground_truth, flat_metrics
from pipeline.failures import result_box, setup_or_none, take_answer
from pipeline.quiet import quiet_worker
from pipeline.state_file import STATE_FILE, load_state, model_config, whole_checkpoints


def pick_checkpoint(path: str, best: bool = False) -> str:
    """The checkpoint `panet eval` reads: `path` itself, or one of a job directory's.

    Args:
        path: a checkpoint (`step-*` directory or its `state.pt`) or a job directory.
        best: from a job directory, the checkpoint with the highest segm AP (its
            `metrics.json`) instead of the latest.

    Returns:
        The checkpoint path; for a job directory the choice is printed.

    Raises:
        FileNotFoundError: nothing to evaluate there (naming the path).
    """
    p = storage.as_path(path)  # a local Path, or a StoragePath for s3:// / gs://
    if p.is_file() or (p / STATE_FILE).is_file() or not p.is_dir():
        return path  # a checkpoint, or missing: the loader names the file
    candidates: list[Any] = [d / STATE_FILE for d in whole_checkpoints(p, warn=print)]
    if not candidates:
        raise FileNotFoundError(
            f"{path!r} is neither a checkpoint nor a job directory with step-*/{STATE_FILE}"
        )

    def segm_ap(state_file: Any) -> float:
        try:
            return float(json.loads((state_file.parent / "metrics.json").read_text())["segm/AP"])
        except (OSError, ValueError, KeyError):
            return -1.0

    chosen = max(candidates, key=segm_ap) if best else candidates[-1]
    which = f"best by segm AP ({segm_ap(chosen):.3f})" if best else "latest"
    print(f"[panet] evaluating {chosen.parent} ({which} of {len(candidates)} in {p})", flush=True)
    return str(chosen.parent)


def run_eval_job(
    checkpoint: str,
    data: str,
    num_workers: int,
    batch_size: int,
    use_gpu: bool = False,
    model_overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
    """`panet eval`: distributed inference over `data`, scored with pycocotools on rank 0.

    Args:
        checkpoint: a checkpoint directory or its state.pt (a path or an s3:// / gs:// URI).
        data: the shard directory to evaluate (a path or a URI).
        num_workers: Ray Train workers.
        batch_size: images per inference batch and worker.
        use_gpu: one GPU per worker.
        model_overrides: `{"model.dotted.key": value}` for the checkpoint's model config, e.g.
            the test-time tricks `{"model.test.flip": True}` (`state_file.model_config`).

    Returns:
        The 12 COCO metrics.

    Raises:
        ValueError / FileNotFoundError: a bad checkpoint, data or override (before Ray starts),
            too few GPUs, or a worker's setup error.
    """
    checkpoint, data = storage.absolute(checkpoint), storage.absolute(data)
    state, manifest = _check_inputs(checkpoint, data, model_overrides)
    ray_session.connect(min_cpus=num_workers + 2)  # CPUs for the decode tasks beside the workers
    if use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if num_workers > gpus and not ray_session.autoscaler_max_resources():
            raise ValueError(
                f"--gpu: {num_workers} workers need one GPU each, but the cluster has {gpus:g}"
            )

    results = result_box()
    worker_config = {
        "checkpoint": checkpoint,
        "data": data,
        "batch_size": batch_size,
        "inverse_labels": inverse_label_map(manifest),
        "results": results,
        "model_overrides": model_overrides or {},
    }
    with tempfile.TemporaryDirectory(prefix="panet-eval-") as run_storage:
        trainer = _trainer(worker_config, num_workers, use_gpu, run_storage, state["config"])
        trainer.fit()
    answer = take_answer(results)  # raises a worker's setup error
    if "metrics" not in answer:
        raise RuntimeError("panet eval: the workers finished without reporting metrics")
    return {k: float(v) for k, v in answer["metrics"].items()}


def _check_inputs(
    checkpoint: str, data: str, model_overrides: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's state and the data's manifest, checked before Ray starts."""
    state = load_state(checkpoint)  # fails here, naming the file
    model_config(state, model_overrides)  # and so does a bad --set
    manifest = load_manifest(data)
    names = [c["name"] for c in manifest["categories"]]
    trained = list(state.get("categories", {}).values())
    if trained and trained != names:
        raise ValueError(
            f"data {data!r} has categories {names[:5]}, the checkpoint was trained on {trained[:5]}"
        )
    return state, manifest


def _trainer(
    worker_config: dict[str, Any],
    num_workers: int,
    use_gpu: bool,
    run_storage: str,
    trained_config: dict[str, Any],
) -> Any:
    """The `TorchTrainer` of `eval_worker`s over the eval dataset, decoded as in training."""
    return TorchTrainer(
        eval_worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"eval-{os.getpid()}",
            storage_path=run_storage,
            worker_runtime_env=ray_session.worker_env(),
        ),
        datasets={
            "eval": build_eval_dataset(worker_config["data"], **decode_options(trained_config))
        },
        dataset_config=ReaderDataConfig(eval_datasets=("eval",), preserve_order=True),
    )


def eval_worker(config: dict[str, Any]) -> None:
    """`panet eval` on every worker: load the checkpoint, evaluate, hand the metrics back."""
    quiet_worker()
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    results = config["results"]  # a `ResultBox` actor: rank 0 may be on another node

    def load_model() -> Any:
        state = load_state(config["checkpoint"])
        cfg = model_config(state, config.get("model_overrides"))
        model = build_panet(cfg, num_classes=int(state["num_classes"]))
        model.load_state_dict(state["model"])
        return model

    model = setup_or_none(load_model, results, device)
    if model is None:
        return
    model.to(device)
    gt = coco_ground_truth(config["data"]) if rank == 0 else None
    batches = iter_eval_batches(ray.train.get_dataset_shard("eval"), config["batch_size"])
    metrics = evaluate(model, batches, gt, config["inverse_labels"], device)
    if metrics is not None:
        # Ray Train V2 hands the driver no metrics without a checkpoint: the actor does.
        ray.get(results.put.remote("metrics", metrics))
    ray.train.report(flat_metrics(metrics or {}))
