"""Does PANet's extra work run as efficiently as Mask R-CNN's?

Side by side in one process, interleaved round by round (this machine is noisy): train-step and
inference time, peak memory and FLOPs of torchvision's Mask R-CNN, our `rbl`, each PANet
component alone on top of `rbl` (BPA, AFP, FF, HHD), and the full `panet`; ResNet-50 at 512 px
short side with the paper's RoI settings (512 RoIs an image, batch 2), and the `tiny` preset.
Also each AFP per-level layer implementation (one grouped op vs a loop over the 4 levels) and
the achieved FLOP/s against this machine's measured fp32 matmul peak.

    python benchmarks/model_step.py [--quick] [--reps N]

The last line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from machine import print_machine  # benchmarks/ is on sys.path when run as a script
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from panet_model import PANetConfig, build_panet

NUM_CLASSES = 91
R50_SHORT, R50_LONG = 512, 853
TINY_SHORT, TINY_LONG = 256, 400


def _roi_align_flops(
    rois: torch.Tensor, scale: float, ph: int, pw: int, sampling: int, aligned: bool, channels: int
) -> int:
    """RoIAlign's arithmetic: one multiply-add (2 FLOPs) per bilinear tap (4 a sampling point)."""
    if sampling > 0:
        points = rois.shape[0] * ph * pw * sampling * sampling
    else:  # adaptive: ceil(roi size / bins) points per bin side, per RoI
        w = (rois[:, 3] - rois[:, 1]) * scale
        h = (rois[:, 4] - rois[:, 2]) * scale
        if not aligned:
            w, h = w.clamp(min=1.0), h.clamp(min=1.0)
        points = int((torch.ceil(h / ph) * torch.ceil(w / pw)).sum()) * ph * pw
    return 2 * 4 * points * channels


def _roi_align_forward_flops(*args: Any, out_val: Any = None) -> int:
    x, rois, scale, ph, pw, sampling, aligned = args  # torchvision::roi_align's schema
    return _roi_align_flops(rois, scale, ph, pw, sampling, aligned, x.shape[1])


def _roi_align_backward_flops(*args: Any, out_val: Any = None) -> int:
    _, rois, scale, ph, pw, _, c, _, _, sampling, aligned = args  # _roi_align_backward's
    return _roi_align_flops(rois, scale, ph, pw, sampling, aligned, c)


def _mm_flops(a, b, out_val=None):  # noqa: ANN001, ANN202
    """Dense: 2*M*K*N. With a sparse operand (our CPU RoIAlign): 2 * nnz * dense columns."""
    if a.layout != torch.strided:
        return 2 * a._nnz() * b.shape[1]
    if b.layout != torch.strided:
        return 2 * b._nnz() * a.shape[0]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


for _f in (_roi_align_forward_flops, _roi_align_backward_flops, _mm_flops):
    _f._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes tensors, not shapes


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, plus RoIAlign (torchvision's kernel and our sparse product alike)."""
    return FlopCounterMode(
        display=False,
        custom_mapping={
            torch.ops.torchvision.roi_align: _roi_align_forward_flops,
            torch.ops.torchvision._roi_align_backward: _roi_align_backward_flops,
            torch.ops.aten.mm: _mm_flops,
        },
    )


class PeakRSS:
    """Samples the process RSS in a thread: the peak increase over the level at entry, in MB."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakRSS:
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def torchvision_model(short: int, long: int) -> torch.nn.Module:
    trunk = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return MaskRCNN(
        _resnet_fpn_extractor(trunk, 3),
        num_classes=NUM_CLASSES,
        min_size=short,
        max_size=long,
        box_score_thresh=0.0,  # inference always reaches the 100-detection cap: equal mask work
    )


def sample_batch(short: int, long: int, n_instances: int, seed: int) -> tuple[list, list]:
    """Two images at the benchmark scale with `n_instances` rectangles each."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in ((short, long - 50), (short, short + 80)):
        boxes, masks = [], []
        for _ in range(n_instances):
            bw = int(torch.randint(16, w // 2, (1,), generator=g))
            bh = int(torch.randint(16, h // 2, (1,), generator=g))
            x1 = int(torch.randint(0, w - bw, (1,), generator=g))
            y1 = int(torch.randint(0, h - bh, (1,), generator=g))
            m = torch.zeros(h, w, dtype=torch.uint8)
            m[y1 : y1 + bh, x1 : x1 + bw] = 1
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            masks.append(m)
        images.append(torch.rand(3, h, w, generator=g))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.randint(1, NUM_CLASSES, (n_instances,), generator=g),
                "masks": torch.stack(masks),
            }
        )
    return images, targets


def r50_variants(impl: str) -> dict[str, dict[str, Any]]:
    """Overrides of `rbl` for each row; the scale and score threshold match torchvision's."""
    common = {
        "transform.min_size": (R50_SHORT,),
        "transform.max_size": R50_LONG,
        "roi.score_thresh": 0.0,
    }
    panet = PANetConfig.preset("panet").override(
        {**common, "transform.skip_resize_in_training": False, "afp.impl": impl}
    )
    return {
        "rbl": common,
        "+BPA": {**common, "bpa.enabled": True},
        f"+AFP[{impl}]": {**common, "afp.enabled": True, "afp.impl": impl},
        "+FF": {**common, "mask_head.ff.enabled": True, "mask_head.ff.trailing_relu": True},
        "+HHD": {**common, "box_head.type": "4conv1fc"},
        f"panet[{impl}]": panet.flat(),
        f"panet-noMBN[{impl}]": PANetConfig.preset("panet")
        .override(
            {
                **common,
                "transform.skip_resize_in_training": False,
                "afp.impl": impl,
                "backbone.norm": "frozen_bn",
                "backbone.trainable_layers": 3,
                "fpn.norm": "none",
                "bpa.norm": "none",
                "box_head.norm": "none",
                "mask_head.norm": "none",
            }
        )
        .flat(),
    }


def tiny_variants() -> dict[str, dict[str, Any]]:
    common = {
        "transform.min_size": (TINY_SHORT,),
        "transform.max_size": TINY_LONG,
        "transform.skip_resize_in_training": False,
        "roi.score_thresh": 0.0,
    }
    base = {
        **common,
        "bpa.enabled": False,
        "afp.enabled": False,
        "mask_head.ff.enabled": False,
        "box_head.type": "2fc",
    }
    return {"tiny-baseline": base, "tiny": common}


class Row:
    """One model under test, with its timings."""

    def __init__(self, name: str, group: str, make: Callable[[], torch.nn.Module]) -> None:
        self.name, self.group = name, group
        torch.manual_seed(0)
        self.model = make()
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9
        )
        self.train_s: list[float] = []
        self.infer_s: list[float] = []
        self.train_mb = 0.0
        self.infer_mb = 0.0
        self.train_flops = 0
        self.infer_flops = 0

    def train_step(self, images: list, targets: list) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model(images, targets)
        sum(losses.values()).backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self, images: list) -> None:
        self.model.eval()
        self.model(images)

    def count_flops(self, images: list, targets: list) -> None:
        torch.manual_seed(1)
        with flop_counter() as counter:
            self.train_step(images, targets)
        self.train_flops = counter.get_total_flops()
        with flop_counter() as counter:
            self.infer(images)
        self.infer_flops = counter.get_total_flops()

    def measure(self, images: list, targets: list) -> None:
        gc.collect()
        torch.manual_seed(1)  # the samplers draw the same RoIs for every round
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            self.train_step(images, targets)
            self.train_s.append(time.perf_counter() - t0)
        self.train_mb = max(self.train_mb, mem.mb)
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            self.infer(images)
            self.infer_s.append(time.perf_counter() - t0)
        self.infer_mb = max(self.infer_mb, mem.mb)

    @property
    def train_time(self) -> float:
        return statistics.median(self.train_s)

    @property
    def infer_time(self) -> float:
        return statistics.median(self.infer_s)


def run_group(rows: list[Row], batch: tuple[list, list], reps: int) -> None:
    """Count FLOPs (this also warms every row up), then time `reps` interleaved rounds."""
    images, targets = batch
    for row in rows:
        row.count_flops(images, targets)
    for rep in range(reps):
        # Rotate the order every round so no row always runs first (caches, thermal drift).
        order = rows[rep % len(rows) :] + rows[: rep % len(rows)]
        for row in order:
            row.measure(images, targets)


def print_table(rows: list[Row], reference: Row, peak: float) -> None:
    header = (
        f"{'model':<22}{'train s':>9}{'x time':>8}{'x FLOP':>8}{'eff':>6}{'GFLOP/s':>9}"
        f"{'%peak':>7}{'MB':>7} |{'infer s':>9}{'x time':>8}{'x FLOP':>8}{'eff':>6}{'MB':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        tr = r.train_time / reference.train_time
        fr = r.train_flops / reference.train_flops
        ti = r.infer_time / reference.infer_time
        fi = r.infer_flops / reference.infer_flops
        gflops = r.train_flops / r.train_time / 1e9
        print(
            f"{r.name:<22}{r.train_time:>9.3f}{tr:>8.3f}{fr:>8.3f}{fr / tr:>6.2f}{gflops:>9.1f}"
            f"{100 * gflops * 1e9 / peak:>6.1f}%{r.train_mb:>7.0f} |"
            f"{r.infer_time:>9.3f}{ti:>8.3f}{fi:>8.3f}{fi / ti:>6.2f}{r.infer_mb:>7.0f}"
        )
    print(
        "x time / x FLOP: ratios to the first row; eff = FLOP ratio / time ratio (>= 0.91 meets"
        " the target time ratio <= 1.1 x FLOP ratio)"
    )


def r50_rows(quick: bool, only: set[str] | None = None) -> list[Row]:
    """torchvision first; --quick keeps torchvision, rbl and panet only; `only` names rows."""
    rows = [Row("torchvision", "r50", lambda: torchvision_model(R50_SHORT, R50_LONG))]
    impls = ["grouped"] if quick else ["grouped", "loop"]
    seen: set[str] = set()
    for impl in impls:
        for name, updates in r50_variants(impl).items():
            if name in seen or (quick and name not in ("rbl", "panet[grouped]")):
                continue
            if only is not None and name not in only:
                continue
            if impl == "loop" and not name.startswith(("+AFP", "panet[")):
                continue
            seen.add(name)
            cfg = PANetConfig.preset("rbl").override(updates)
            reference = rows[0].model if name == "rbl" else None
            rows.append(Row(name, "r50", lambda cfg=cfg, ref=reference: build_r50(cfg, ref)))
    return rows


def build_r50(cfg: PANetConfig, reference: torch.nn.Module | None) -> torch.nn.Module:
    """A row's model. `rbl` gets torchvision's weights (the same keys), hence the same
    proposals and sampled RoIs: the same work, so its time ratio is pure implementation."""
    model = build_panet(cfg, NUM_CLASSES)
    if reference is not None:
        model.load_state_dict(reference.state_dict())
    return model


def row_key(name: str) -> str:
    return name.lower().replace("+", "").replace("[", "_").replace("]", "").replace("-", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="torchvision, rbl and panet, one round: < 3 min"
    )
    parser.add_argument("--reps", type=int, default=None, help="measured rounds per row")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated R-50 rows beside torchvision, e.g. '+AFP[grouped],rbl'; "
        "skips the tiny table and the JSON line",
    )
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush subnormal floats (the training workers flush them: "
        "pipeline.train.loop.flush_denormals); panet-noMBN then runs its slow path",
    )
    args = parser.parse_args()
    # As the training workers: a norm-free model's saturated softmax makes subnormal gradients.
    torch.set_flush_denormal(not args.keep_denormals)
    only = set(args.only.split(",")) if args.only else None
    known = {name for impl in ("grouped", "loop") for name in r50_variants(impl)}
    if only is not None and not only <= known:
        parser.error(f"--only: unknown row(s) {sorted(only - known)}; rows are {sorted(known)}")
    reps = args.reps or (1 if args.quick else 3)
    torch.set_num_threads(os.cpu_count() or 1)
    machine = print_machine(1.0 if args.quick else 3.0)
    peak = machine["matmul_gflops"] * 1e9

    r50 = r50_rows(args.quick, only)
    t0 = time.perf_counter()
    run_group(r50, sample_batch(R50_SHORT, R50_LONG, 12, seed=0), reps)
    print(
        f"\nResNet-50, {R50_SHORT} px short side, batch 2, 512 RoIs an image "
        f"({reps} round(s), median; {time.perf_counter() - t0:.0f} s)"
    )
    print_table(r50, r50[0], peak)
    if only is not None:
        return

    tiny = [
        Row(
            name,
            "tiny",
            lambda u=u: build_panet(PANetConfig.preset("tiny").override(u), NUM_CLASSES),
        )
        for name, u in tiny_variants().items()
    ]
    run_group(tiny, sample_batch(TINY_SHORT, TINY_LONG, 6, seed=1), max(reps, 2))
    print(f"\ntiny preset, {TINY_SHORT} px short side, batch 2, 64 RoIs an image")
    print_table(tiny, tiny[0], peak)

    by = {r.name: r for r in r50}
    tv = by["torchvision"]
    result: dict[str, Any] = {"matmul_peak_gflops": round(peak / 1e9, 2), "reps": reps}
    for r in r50[1:]:
        key = row_key(r.name)
        result[f"train_ratio_{key}_vs_torchvision"] = round(r.train_time / tv.train_time, 3)
        result[f"train_flop_ratio_{key}_vs_torchvision"] = round(r.train_flops / tv.train_flops, 3)
        result[f"infer_ratio_{key}_vs_torchvision"] = round(r.infer_time / tv.infer_time, 3)
        result[f"infer_flop_ratio_{key}_vs_torchvision"] = round(r.infer_flops / tv.infer_flops, 3)
    if "+AFP[loop]" in by:
        g, lp = by["+AFP[grouped]"], by["+AFP[loop]"]
        result["afp_grouped_vs_loop_train"] = round(g.train_time / lp.train_time, 3)
        result["afp_grouped_vs_loop_infer"] = round(g.infer_time / lp.infer_time, 3)
    panet = by["panet[grouped]"]
    result["train_ratio_panet_vs_torchvision"] = round(panet.train_time / tv.train_time, 3)
    result["train_flop_ratio_panet_vs_torchvision"] = round(panet.train_flops / tv.train_flops, 3)
    result["infer_ratio_panet_vs_torchvision"] = round(panet.infer_time / tv.infer_time, 3)
    result["infer_flop_ratio_panet_vs_torchvision"] = round(panet.infer_flops / tv.infer_flops, 3)
    result["peak_fraction_torchvision_train"] = round(tv.train_flops / tv.train_time / peak, 3)
    result["peak_fraction_panet_train"] = round(panet.train_flops / panet.train_time / peak, 3)
    result["tiny_train_s"] = round(tiny[1].train_time, 3)
    result["tiny_infer_s"] = round(tiny[1].infer_time, 3)
    result["tiny_train_images_per_s"] = round(2 / tiny[1].train_time, 2)
    result["machine"] = machine
    print(json.dumps(result))


if __name__ == "__main__":
    main()
