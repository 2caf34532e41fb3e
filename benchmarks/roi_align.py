"""AFP's multi-level RoIAlign on CPU: torchvision's kernel vs the sparse path, forward + backward.

AFP pools every RoI on all four FPN levels (`panet_model/roi_align.py`). This times one
forward and one backward of that pooling at the shapes of a training step, two ways,
interleaved so that both see the same machine load:

1. `torchvision`: `torchvision.ops.roi_align` per level, stacked (its CPU backward recomputes
   the bilinear weights per channel);
2. `sparse`: the project's path, one sparse-dense product per level and pass
   (`panet_model/roi_align.py`), the one AFP uses on CPU.

Cases: `tiny` (the learning test's step: batch 4 at 256 px, 32 channels, 64 box RoIs and 16
mask RoIs an image) and `panet` (R-50: batch 2 at 800 x 1216 px, 256 channels, 512 box RoIs
and 128 mask RoIs an image). Outputs and gradients of the two are compared.

    python benchmarks/roi_align.py [--reps N] [--threads T] [--only tiny|panet]

The last line is one JSON object with the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from machine import print_machine  # benchmarks/ is on sys.path when run as a script
from torch import Tensor

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
SAMPLING = 2


@dataclass(frozen=True)
class Case:
    """One training step's AFP pooling: the feature maps and the RoIs of one head."""

    name: str
    batch: int
    height: int
    width: int
    channels: int
    rois_per_image: int
    output: int  # 7 (box head) or 14 (mask head)


CASES = {
    "tiny": (Case("tiny box", 4, 256, 256, 32, 64, 7), Case("tiny mask", 4, 256, 256, 32, 16, 14)),
    "panet": (
        Case("panet box", 2, 800, 1216, 256, 512, 7),
        Case("panet mask", 2, 800, 1216, 256, 128, 14),
    ),
}


def inputs(case: Case, seed: int = 0) -> tuple[list[Tensor], Tensor, Tensor]:
    """Feature maps (N, C, H/s, W/s) per level, (K, 5) RoIs, and the output gradient."""
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(
            case.batch, case.channels, int(case.height * s), int(case.width * s), generator=g
        )
        for s in SCALES
    ]
    k = case.batch * case.rois_per_image
    side = torch.exp(torch.empty(k, 2).uniform_(2.5, 6.0, generator=g))  # 12..400 px
    lo = torch.rand(k, 2, generator=g) * torch.tensor([case.width, case.height])
    hi = torch.minimum(lo + side, torch.tensor([case.width, case.height], dtype=torch.float32))
    index = torch.randint(0, case.batch, (k, 1), generator=g).float()
    rois = torch.cat([index, lo, hi], dim=1)
    grad = torch.randn(len(SCALES), k, case.channels, case.output, case.output, generator=g)
    return feats, rois, grad


def run(method: str, case: Case, feats: list[Tensor], rois: Tensor, grad: Tensor) -> Any:
    """One forward + backward; returns (output, feature gradients)."""
    from torchvision.ops import roi_align

    from panet_model.roi_align import multilevel_roi_align

    leaves = [f.detach().requires_grad_() for f in feats]
    size = (case.output, case.output)
    if method == "torchvision":
        pooled = [roi_align(f, rois, size, s, SAMPLING) for f, s in zip(leaves, SCALES)]
        out = torch.stack(pooled)  # L x (K, C, PH, PW) -> (L, K, C, PH, PW)
    else:
        out = multilevel_roi_align(leaves, rois, size, SCALES, SAMPLING)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


METHODS = ("torchvision", "sparse")


def measure(case: Case, reps: int) -> dict[str, Any]:
    """Median seconds per method (interleaved reps after one warm-up each) and agreement."""
    feats, rois, grad = inputs(case)
    results = {m: run(m, case, feats, rois, grad) for m in METHODS}  # warm-up + agreement
    ref_out, ref_grads = results["torchvision"]
    diff = max(
        (x - y).abs().max().item()
        for out, grads in (results[m] for m in METHODS[1:])
        for x, y in zip((out, *grads), (ref_out, *ref_grads))
    )
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(reps):
        for m in METHODS:
            times[m].append(timed(lambda m=m: run(m, case, feats, rois, grad)))
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"case": case.name, "rois": rois.shape[0], "seconds": med, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(CASES), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = print_machine()
    rows = []
    for key, cases in CASES.items():
        if args.only in (None, key):
            rows += [measure(case, args.reps) for case in cases]
    print(
        f"\nAFP RoIAlign on 4 levels, forward + backward, {args.threads} threads, median of "
        f"{args.reps} interleaved reps; x = time / sparse"
    )
    head = f"{'case':<12}{'RoIs':>6}" + "".join(f"{m:>16}{'x':>7}" for m in METHODS)
    print(head + f"{'max |diff|':>12}")
    print("-" * len(head + " " * 12))
    for r in rows:
        sparse = r["seconds"]["sparse"]
        cells = "".join(
            f"{r['seconds'][m] * 1e3:>13.1f} ms{r['seconds'][m] / sparse:>7.2f}" for m in METHODS
        )
        print(f"{r['case']:<12}{r['rois']:>6}{cells}{r['max_abs_diff']:>12.1e}")
    summary = {
        r["case"].replace(" ", "_"): {
            "ms": {m: round(r["seconds"][m] * 1e3, 2) for m in METHODS},
            "torchvision_over_sparse": round(
                r["seconds"]["torchvision"] / r["seconds"]["sparse"], 3
            ),
            "max_abs_diff": r["max_abs_diff"],
        }
        for r in rows
    }
    print(json.dumps({"threads": args.threads, "reps": args.reps, **summary, "machine": machine}))


if __name__ == "__main__":
    main()
