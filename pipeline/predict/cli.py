"""`panet predict`: detections of a trained model on your images, in COCO results format.

    panet predict --model CHECKPOINT_OR_MLFLOW_URI INPUT... --out DIR [--ray --replicas N]

`jobs/predict.py` runs the same code for `ray job submit`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.args import add_set_option
from pipeline.config import parse_set


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict images, folders or shard directories with a checkpoint or MLflow model",
        description="Write COCO results (results.json: RLE masks, the dataset's category ids), "
        "images.json and one picture per image into --out. Unreadable images are reported and "
        "skipped. With --ray, a Ray Data actor pool of model replicas also writes Parquet.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (or its state.pt), MLflow model URI (models:/<name>@champion, "
        "models:/<name>/<version>, runs:/<run id>/model) or local MLflow model directory",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders, shard dirs")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument(
        "--score-threshold", type=float, default=0.5, help="lowest score kept (default 0.5)"
    )
    p.add_argument(
        "--max-detections", type=int, default=100, help="most detections per image (default 100)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_set_option(
        p,
        "override a model config value, e.g. --set model.test.flip=true (test-time tricks: "
        "model.test.scales, .max_size, .flip, .box_vote, .mask_vote)",
    )
    p.add_argument("--no-pictures", action="store_true", help="do not draw the pictures")
    _add_mlflow_arguments(p)
    ray = p.add_argument_group("batch inference on Ray Data")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data with model replicas")
    ray.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    ray.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images a replica takes at a time (default 16): larger amortizes Ray Data's cost per "
        "task, smaller streams the first results sooner",
    )
    ray.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="CPUs (torch threads) per replica"
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs Ray reserves for each replica (default: 1 with --device cuda, else 0; "
        "0.5 puts two replicas on one GPU)",
    )
    p.set_defaults(func=cmd_predict)


def _add_mlflow_arguments(p: argparse.ArgumentParser) -> None:
    """The options of an MLflow --model."""
    p.add_argument("--tracking-uri", help="MLflow store of a models:/ or runs:/ URI")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load an MLflow model that holds only a pickled module (one not logged by `panet "
        "train`): unpickling runs any code in it, so only for a model you trust",
    )
    p.add_argument(
        "--register",
        metavar="NAME",
        help="register the MLflow --model as a new version of registered model NAME",
    )


def cmd_predict(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"panet predict: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Check everything that can be checked before loading a model or starting Ray, then run."""
    # deferred: `panet --help` imports this module; prediction loads torch, Ray, pyarrow, PIL
    from pipeline.predict.images import collect_inputs
    from pipeline.predict.predictor import is_mlflow_model, load_predictor

    if args.register:
        _register(args)
        if not args.inputs:
            return 0
    if not args.inputs:
        raise ValueError("no INPUT given: name image files, folders or shard directories")
    if args.replicas < 1 or args.batch_size < 1:
        raise ValueError("--replicas and --batch-size must be >= 1")
    replica_dev = ""
    if args.ray:
        from pipeline.predict.batch import replica_device

        replica_dev, gpus = replica_device(args.device, args.gpus_per_replica)
        replica_dev += f" ({args.replicas} replicas x {gpus:g} GPU)" if gpus else ""
    files, shards = collect_inputs(args.inputs)
    total = len(files) + _shard_rows(shards)
    options: dict[str, Any] = {
        "device": args.device,
        "tracking_uri": args.tracking_uri,
        "overrides": parse_set(args.set),
        "score_threshold": args.score_threshold,
        "max_detections": args.max_detections,
        "allow_pickle": args.allow_pickle,
    }
    # Loaded here also with --ray: a bad model fails now, and images.json needs the classes. On
    # the CPU: the replicas predict, and a cluster's driver runs on its head, which has no GPU.
    predictor = load_predictor(
        args.model, **({**options, "device": "cpu"} if args.ray else options)
    )
    out = Path(args.out)
    print(
        f"[predict] {total} images, model {args.model} "
        f"({'MLflow' if is_mlflow_model(args.model) else 'checkpoint'}, "
        f"{len(predictor.categories)} classes) on {replica_dev or predictor.device}",
        flush=True,
    )
    if args.ray:
        summary = _predict_on_ray(args, files, shards, options, predictor.categories, total)
    else:
        summary = predict_locally(predictor, files, shards, out, total, not args.no_pictures)
    print(f"[predict] done: {done_line(summary, total)} -> {out}", flush=True)
    return 0 if summary["images"] > 0 else 1


def _register(args: argparse.Namespace) -> None:
    """`--register NAME`: the MLflow --model as a new version of NAME."""
    from pipeline.predict.predictor import tracking_uri_for

    if not args.model.startswith(("models:/", "runs:/")):
        raise ValueError("--register needs an MLflow --model URI (models:/... or runs:/...)")

    uri = tracking_uri_for(args.model, args.tracking_uri)
    version = tracking.register_model(uri, args.model, args.register)
    print(f"registered {args.model} as models:/{args.register}/{version}")


def _predict_on_ray(
    args: argparse.Namespace,
    files: list[str],
    shards: list[str],
    options: dict[str, Any],
    categories: Any,
    total: int,
) -> dict[str, Any]:
    """`--ray`: the inputs through a Ray Data pool of model replicas; the writer's summary."""
    from pipeline.predict.batch import predict_with_ray

    return predict_with_ray(
        args.model,
        files,
        shards,
        Path(args.out),
        options=options,
        categories=categories,
        total=total,
        replicas=args.replicas,
        batch_size=args.batch_size,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        pictures=not args.no_pictures,
    )


def done_line(summary: dict[str, Any], total: int) -> str:
    """What became of the inputs: predicted, skipped (their ids unused), upscaled, the rate."""
    from pipeline.predict.results import MAX_UPSCALE

    parts = [
        f"{summary['images']} of {total} images predicted",
        f"{summary['detections']} detections",
    ]
    if summary["skipped"]:
        parts.append(f"{summary['skipped']} skipped (their image ids left unused)")
    if summary["upscaled"]:
        parts.append(
            f"{summary['upscaled']} upscaled over {MAX_UPSCALE:g}x by the model (warned above; "
            "far below its input size, their detections are unreliable)"
        )
    return ", ".join([*parts, f"{summary['images_per_s']:.2f} images/s"])


def predict_locally(
    predictor: Any, files: list[str], shards: list[str], out: Path, total: int, pictures: bool
) -> dict[str, Any]:
    """The plain loop: every image through one model in this process.

    Returns:
        The `ResultWriter.close` summary.
    """
    from pipeline.predict.images import iter_items
    from pipeline.predict.results import ResultWriter, predict_item

    writer = ResultWriter(out, predictor.categories, total)
    folder = None
    if pictures:
        folder = Path(out) / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
    for item in iter_items(files, shards):
        writer.add([predict_item(predictor, item, folder)])
    return writer.close()


def _shard_rows(shards: list[str]) -> int:
    from pipeline.data.manifest import load_manifest
    from pipeline.data.reader import num_rows

    return sum(num_rows(load_manifest(s)) for s in shards)
