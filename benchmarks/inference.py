"""How fast does `panet predict` run, and what do Ray Data and the test-time tricks cost?

On this CPU: single-image latency and plain-loop throughput of the `tiny` and ResNet-50 `panet`
presets on real photographs (scikit-image's samples); Ray Data batch inference over a shard
directory of the synthetic validation set against the plain loop on the same images, with 1
replica (the same torch threads as the loop) and with 2 replicas; and the cost of each test-time
trick relative to plain inference. Models are randomly initialised and keep every detection
above 0.05, so each image has the full 100 detections to encode (a trained model's COCO-eval
load); nothing is downloaded.

    python benchmarks/inference.py [--quick] [--images N] [--reps N]

Throughputs are steady-state: from the first result to the last, so model loading and Ray's
actor start-up are left out of both sides. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import print_machine  # benchmarks/ is on sys.path when run as a script

from panet_model import PANetConfig, build_panet
from panet_model.config import TestConfig as Tricks
from pipeline.ray_session import use_worker_onednn_cache
from pipeline.state_file import save_state

CATEGORIES = {1: "rectangle", 2: "ellipse", 3: "triangle"}
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
SCORE = 0.05


def photographs() -> list[np.ndarray]:
    import skimage

    from pipeline.predict.images import decode

    folder = Path(skimage.__file__).parent / "data"
    return [decode((folder / name).read_bytes(), name) for name in PHOTOS]


def checkpoint(tmp: Path, preset: str) -> Path:
    """A randomly initialised model of `preset`, saved as a training checkpoint."""
    torch.manual_seed(0)
    cfg = PANetConfig.preset(preset)
    model = build_panet(cfg, num_classes=len(CATEGORIES) + 1)
    directory = tmp / preset
    directory.mkdir()
    config = {"model": {"preset": preset, **cfg.to_dict()}}
    save_state(directory, model=model.state_dict(), categories=CATEGORIES, config=config)
    return directory


def latency_ms(predictor: Any, image: np.ndarray, reps: int) -> list[float]:
    predictor.predict(image)  # warm-up: oneDNN primitives, allocator
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        predictor.predict(image)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def loop_images_per_s(predictor: Any, images: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for image in images:
        predictor.predict(image)
    return len(images) / (time.perf_counter() - t0)


def trick_costs(predictor: Any, images: list[np.ndarray], reps: int) -> dict[str, float]:
    """Seconds per image of each trick over seconds per image of plain inference (medians)."""
    scale = predictor.model.transform.min_size[-1]
    tricks = {
        "plain": Tricks(),
        "flip": Tricks(flip=True),
        "multi_scale": Tricks(scales=(scale - 64, scale, scale + 64)),
        "box_vote": Tricks(box_vote=True),
        "mask_vote": Tricks(mask_vote=True),
        "all": Tricks(
            scales=(scale - 64, scale, scale + 64), flip=True, box_vote=True, mask_vote=True
        ),
    }
    seconds: dict[str, list[float]] = {k: [] for k in tricks}
    for _ in range(reps):  # interleaved, round by round: the host is shared
        for name, test in tricks.items():
            predictor.model.test = test
            seconds[name].append(1 / loop_images_per_s(predictor, images))
    predictor.model.test = Tricks()
    plain = statistics.median(seconds["plain"])
    return {k: statistics.median(v) / plain for k, v in seconds.items()}


def ray_vs_plain(ckpt: Path, shards: Path, out: Path, reps: int) -> dict[str, Any]:
    """Steady-state images/s of the plain loop and of Ray Data with 1 and 2 replicas."""
    import ray

    from pipeline.data.manifest import load_manifest
    from pipeline.data.reader import num_rows
    from pipeline.predict.batch import predict_with_ray
    from pipeline.predict.cli import predict_locally
    from pipeline.predict.predictor import load_predictor

    threads = torch.get_num_threads()
    total = num_rows(load_manifest(shards))
    options = {"device": "cpu", "score_threshold": SCORE}
    ray.init(num_cpus=threads + 2, include_dashboard=False)
    rates: dict[str, list[float]] = {"plain": [], "ray_1": [], "ray_2": []}
    try:
        for rep in range(reps):
            predictor = load_predictor(str(ckpt), **options)
            summary = predict_locally(
                predictor, [], [str(shards)], out / f"plain{rep}", total, False
            )
            rates["plain"].append(summary["steady_images_per_s"])
            for replicas in (1, 2):
                summary = predict_with_ray(
                    str(ckpt),
                    [],
                    [str(shards)],
                    out / f"ray{replicas}-{rep}",
                    options=options,
                    categories=CATEGORIES,
                    total=total,
                    replicas=replicas,
                    batch_size=16,  # `panet predict --ray`'s default
                    cpus_per_replica=threads / replicas,
                )
                rates[f"ray_{replicas}"].append(summary["steady_images_per_s"])
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"rates": rates, "median": med, "images": total, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repetitions")
    parser.add_argument("--images", type=int, default=0, help="validation images for Ray vs loop")
    parser.add_argument("--reps", type=int, default=0, help="repetitions of each measurement")
    args = parser.parse_args()
    use_worker_onednn_cache()
    reps = args.reps or (2 if args.quick else 3)
    n_val = args.images or (40 if args.quick else 120)
    machine = print_machine()
    from pipeline.demo import ensure_shards
    from pipeline.predict.predictor import load_predictor

    photos = photographs()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp_dir:
        tmp = Path(tmp_dir)
        results: dict[str, Any] = {}
        for preset, lat_reps in (("tiny", 5 * reps), ("panet", reps)):
            predictor = load_predictor(str(checkpoint(tmp, preset)), score_threshold=SCORE)
            lat = latency_ms(predictor, photos[0], lat_reps)
            ips = [loop_images_per_s(predictor, photos) for _ in range(reps)]
            results[preset] = {"latency_ms": lat, "images_per_s": ips}
            print(
                f"{preset:>6}: latency {statistics.median(lat):8.1f} ms "
                f"(min {min(lat):.1f}, max {max(lat):.1f}, {len(lat)} runs), "
                f"loop {statistics.median(ips):.2f} images/s over {len(photos)} photographs",
                flush=True,
            )
        tiny = load_predictor(str(tmp / "tiny"), score_threshold=SCORE)
        costs = trick_costs(tiny, photos, reps)
        print("\ntest-time trick cost, tiny, relative to plain inference (median):")
        for name, ratio in costs.items():
            print(f"  {name:<12} {ratio:6.2f}x")
        shards = ensure_shards(tmp / "raw", tmp / "shards", "val", n_val, 1)
        ray_res = ray_vs_plain(tmp / "tiny", shards, tmp / "out", reps)
    med = ray_res["median"]
    print(
        f"\nbatch inference, tiny, {ray_res['images']} synthetic validation images, "
        f"{ray_res['threads']} torch threads in all (steady-state images/s, median of {reps}):"
    )
    print(f"  {'plain loop':<26} {med['plain']:6.2f}   {ray_res['rates']['plain']}")
    for k in (1, 2):
        print(
            f"  {f'Ray Data, {k} replica' + 's' * (k > 1):<26} {med[f'ray_{k}']:6.2f}   "
            f"{ray_res['rates'][f'ray_{k}']}  ({med[f'ray_{k}'] / med['plain']:.3f}x plain)"
        )
    figures = {
        "ray_vs_plain_ratio": round(med["ray_1"] / med["plain"], 3),
        "ray_2_replicas_vs_plain_ratio": round(med["ray_2"] / med["plain"], 3),
        "tiny_images_per_s": round(statistics.median(results["tiny"]["images_per_s"]), 3),
        "tiny_latency_ms": round(statistics.median(results["tiny"]["latency_ms"]), 1),
        "panet_r50_images_per_s": round(statistics.median(results["panet"]["images_per_s"]), 3),
        "panet_r50_latency_ms": round(statistics.median(results["panet"]["latency_ms"]), 1),
        "plain_loop_images_per_s": round(med["plain"], 3),
        "tta_flip_cost_ratio": round(costs["flip"], 3),
        "tta_multi_scale_cost_ratio": round(costs["multi_scale"], 3),
        "tta_box_vote_cost_ratio": round(costs["box_vote"], 3),
        "tta_mask_vote_cost_ratio": round(costs["mask_vote"], 3),
        "tta_all_cost_ratio": round(costs["all"], 3),
        "matmul_gflops": machine.get("matmul_gflops"),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
