"""`pipeline.evaluate`'s scoring and distributed evaluation: ground truth from shards, result
conversion, COCOeval, gathering.

The ground truth is a real shard directory (synthetic COCO scenes through the COCO converter),
edited so that it has an image without any annotation and a crowd region. "Perfect" predictions
are derived from that ground truth and go through `predictions_to_coco` like model outputs.

The distributed cases run in one pair of spawned gloo processes for the whole module (a spawn
costs seconds of imports); module-level imports stay light for the same reason.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor, nn

from pipeline.evaluate.distributed import evaluate, gather, gather_group, infer
from pipeline.evaluate.scoring import (
    METRIC_NAMES,
    coco_ground_truth,
    format_metrics,
    predictions_to_coco,
    score,
)

SEED = 3  # this seed's six scenes hold crowd regions and objects of all three COCO sizes
N_IMAGES = 6
WORLD_SIZE = 2
GLOO_TIMEOUT_S = 60
SPAWN_TIMEOUT_S = 180
KEYS = [f"{t}/{m}" for t in ("bbox", "segm") for m in METRIC_NAMES]


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


def _make_shards(root: Path) -> Path:
    """Synthetic COCO -> shards, with the first image's annotations removed and a crowd forced."""
    from pipeline.data.convert_coco import convert_coco
    from pipeline.data.synth import write_synthetic

    write_synthetic("coco", N_IMAGES, SEED, root / "coco")
    ann_file = root / "coco" / "annotations" / "instances_train.json"
    doc = json.loads(ann_file.read_text())
    first, last = doc["images"][0]["id"], doc["images"][-1]["id"]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != first]
    # Whatever the generator's crowd draws, the last image has a crowd region.
    next(a for a in doc["annotations"] if a["image_id"] == last)["iscrowd"] = 1
    ann_file.write_text(json.dumps(doc))
    out = root / "shards"
    convert_coco(ann_file, root / "coco" / "images" / "train", out, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_shards(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def gt(shard_dir: Path) -> COCO:
    return coco_ground_truth(shard_dir)


def _label_maps(gt: COCO) -> tuple[dict[int, int], dict[int, int]]:
    """(dataset id -> contiguous label, its inverse), as `reader.label_map` builds them."""
    labels = {c["id"]: i + 1 for i, c in enumerate(gt.dataset["categories"])}
    return labels, {v: k for k, v in labels.items()}


def _gt_outputs(
    gt: COCO,
    image_ids: list[int] | None = None,
    *,
    shift: int = 0,
    relabel: Callable[[int], int] = lambda label: label,
    crowd: bool = False,
) -> tuple[list[dict[str, Tensor]], list[int]]:
    """Model-like outputs that copy the ground truth: boxes and masks of the GT, score 1.0.

    Args:
        gt: ground truth.
        image_ids: images to predict for (default: all).
        shift: move every box and mask right and down by this many pixels.
        relabel: contiguous label -> predicted label.
        crowd: also "detect" the crowd regions.

    Returns:
        (outputs, image_ids) for `predictions_to_coco`.
    """
    labels, _ = _label_maps(gt)
    image_ids = sorted(gt.getImgIds()) if image_ids is None else image_ids
    outputs = []
    for image_id in image_ids:
        img = gt.imgs[image_id]
        anns = [a for a in gt.imgToAnns[image_id] if crowd or not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> x1y1x2y2
        boxes += shift
        masks = torch.zeros(len(anns), 1, img["height"], img["width"])
        for i, a in enumerate(anns):
            m = torch.from_numpy(gt.annToMask(a)).float()
            masks[i, 0] = torch.roll(m, shifts=(shift, shift), dims=(0, 1))
        outputs.append(
            {
                "boxes": boxes,
                "labels": torch.tensor(
                    [relabel(labels[a["category_id"]]) for a in anns], dtype=torch.int64
                ),
                "scores": torch.ones(len(anns)),
                "masks": masks,
            }
        )
    return outputs, image_ids


def _gt_results(gt: COCO, image_ids: list[int] | None = None, **kw: Any) -> list[dict[str, Any]]:
    outputs, ids = _gt_outputs(gt, image_ids, **kw)
    return predictions_to_coco(outputs, ids, _label_maps(gt)[1])


# ---------------------------------------------------------------------------------------------
# Ground truth


def test_ground_truth_from_shards(shard_dir: Path, gt: COCO) -> None:
    from pipeline.data.manifest import iter_records, load_manifest

    records = list(iter_records(shard_dir))
    manifest = load_manifest(shard_dir)
    assert sorted(gt.getImgIds()) == sorted(r["image_id"] for r in records)
    assert [c["id"] for c in gt.dataset["categories"]] == [c["id"] for c in manifest["categories"]]
    assert len(gt.anns) == sum(len(r["annotations"]) for r in records)
    assert 0 not in gt.anns  # COCOeval reads id 0 as "unmatched"
    # The fixture's edge cases made it through: an image without GT and a crowd region.
    assert gt.getAnnIds(imgIds=[records[0]["image_id"]]) == []
    assert any(a["iscrowd"] for a in gt.anns.values())
    for record in records:
        anns = gt.imgToAnns[record["image_id"]]
        img = gt.imgs[record["image_id"]]
        assert (img["height"], img["width"]) == (record["height"], record["width"])
        for ann, src in zip(anns, record["annotations"]):
            assert ann["segmentation"] == {
                "size": [record["height"], record["width"]],
                "counts": src["rle"],
            }
            assert ann["bbox"] == pytest.approx(src["bbox"])
            assert (ann["category_id"], ann["iscrowd"]) == (src["category_id"], src["iscrowd"])
            assert gt.annToMask(ann).shape == (record["height"], record["width"])


# ---------------------------------------------------------------------------------------------
# predictions_to_coco


def test_predictions_to_coco_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1, 9, 13, generator=g)
    probs[0, 0, 2, 3] = 0.5  # exactly the threshold: background (foreground is "> 0.5")
    output = {
        "boxes": torch.tensor([[1.0, 2.0, 5.0, 8.0], [0.5, 0.25, 12.0, 9.0], [3, 3, 4, 4]]),
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.9, 0.5, 0.125]),
        "masks": probs,
    }
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, 9, 13),
    }
    results = predictions_to_coco([output, empty], [torch.tensor(42), 43], {1: 7, 2: 3})
    assert len(results) == 3
    assert [r["image_id"] for r in results] == [42, 42, 42]
    assert [r["category_id"] for r in results] == [7, 3, 7]
    assert results[0]["bbox"] == pytest.approx([1.0, 2.0, 4.0, 6.0])
    assert results[1]["bbox"] == pytest.approx([0.5, 0.25, 11.5, 8.75])
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.5, 0.125])
    expected = (probs[:, 0] > 0.5).numpy()
    for i, r in enumerate(results):
        seg = r["segmentation"]
        assert seg["size"] == [9, 13]
        assert isinstance(seg["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(seg), expected[i])
    assert not mask_utils.decode(results[0]["segmentation"])[2, 3]
    json.dumps(results)  # plain Python types only

    # Already-binary (N, H, W) masks give the same RLEs; another threshold gives others.
    binary = dict(output, masks=probs[:, 0] > 0.5)
    assert predictions_to_coco([binary], [42], {1: 7, 2: 3}) == results
    high = predictions_to_coco([output], [42], {1: 7, 2: 3}, mask_threshold=0.9)
    np.testing.assert_array_equal(
        mask_utils.decode(high[1]["segmentation"]), (probs[1, 0] > 0.9).numpy()
    )


def test_predictions_to_coco_errors() -> None:
    output = {
        "boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
        "labels": torch.tensor([5]),
        "scores": torch.tensor([1.0]),
        "masks": torch.ones(1, 1, 4, 4),
    }
    with pytest.raises(ValueError, match="label 5"):
        predictions_to_coco([output], [1], {1: 1})
    with pytest.raises(ValueError, match="1 outputs but 2 image ids"):
        predictions_to_coco([output], [1, 2], {5: 1})
    boxes_only = {k: v for k, v in output.items() if k != "masks"}
    (r,) = predictions_to_coco([boxes_only], [1], {5: 1})
    assert "segmentation" not in r


# ---------------------------------------------------------------------------------------------
# score


def test_perfect_predictions_score_one(gt: COCO) -> None:
    results = _gt_results(gt)
    metrics = score(gt, results)
    assert sorted(metrics) == sorted(KEYS)
    for t in ("bbox", "segm"):
        for m in ("AP", "AP50", "AP75"):
            assert metrics[f"{t}/{m}"] == pytest.approx(1.0)
    for key, value in metrics.items():
        assert math.isnan(value) or value == pytest.approx(1.0), key
    # A detection on a crowd region is matched to it and ignored, not counted as a false positive.
    with_crowd = _gt_results(gt, crowd=True)
    assert len(with_crowd) > len(results)
    assert score(gt, with_crowd) == pytest.approx(metrics, nan_ok=True)
    assert results == _gt_results(gt)  # score did not write into the results


def test_worse_predictions_score_lower(gt: COCO) -> None:
    perfect = score(gt, _gt_results(gt))
    n_classes = len(gt.dataset["categories"])
    shifted = score(gt, _gt_results(gt, shift=3))
    wrong = score(gt, _gt_results(gt, relabel=lambda label: label % n_classes + 1))
    image_ids = sorted(gt.getImgIds())
    # Missing all predictions of an image with GT: its objects count as misses.
    partial = score(gt, _gt_results(gt, image_ids[:-1]))
    # A confident false positive on the image without GT counts too.
    empty_image = next(i for i in image_ids if not gt.getAnnIds(imgIds=[i]))
    spurious = _moved(gt, _gt_results(gt, [image_ids[-1]])[0], empty_image)
    fp = score(gt, _gt_results(gt) + [spurious])
    for t in ("bbox", "segm"):
        assert shifted[f"{t}/AP75"] < perfect[f"{t}/AP75"]
        assert shifted[f"{t}/AP"] < perfect[f"{t}/AP"]
        assert wrong[f"{t}/AP"] < 0.1
        assert partial[f"{t}/AP"] < 1.0
        assert partial[f"{t}/AP50"] < 1.0
        assert fp[f"{t}/AP"] < 1.0


def _moved(gt: COCO, result: dict[str, Any], image_id: int) -> dict[str, Any]:
    """`result` as a detection on `image_id`: a box in its corner, a mask of that box."""
    img = gt.imgs[image_id]
    mask = np.zeros((img["height"], img["width"]), np.uint8, order="F")
    mask[:20, :20] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(result, image_id=image_id, bbox=[0.0, 0.0, 20.0, 20.0], segmentation=rle)


def test_no_predictions_give_zeros(gt: COCO) -> None:
    perfect = score(gt, _gt_results(gt))
    metrics = score(gt, [])
    assert sorted(metrics) == sorted(KEYS)
    for key, value in metrics.items():
        # 0 wherever there is GT to miss; NaN exactly where there is none (as with results).
        assert (math.isnan(value) and math.isnan(perfect[key])) or value == 0.0, key
    assert metrics["bbox/AP"] == 0.0 and metrics["segm/AP"] == 0.0


def test_size_range_without_gt_is_nan() -> None:
    # One 4x4 (small) object: COCOeval's -1 for medium and large becomes NaN.
    gt = COCO()
    mask = np.zeros((20, 30), np.uint8, order="F")
    mask[2:6, 3:7] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    gt.dataset = {
        "images": [{"id": 1, "height": 20, "width": 30}, {"id": 2, "height": 20, "width": 30}],
        "categories": [{"id": 4, "name": "square"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [3.0, 2.0, 4.0, 4.0],
             "area": 16.0, "iscrowd": 0, "segmentation": rle},
        ],
    }  # fmt: skip
    gt.createIndex()
    output = {
        "boxes": torch.tensor([[3.0, 2.0, 7.0, 6.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.8]),
        "masks": torch.from_numpy(mask)[None, None].float(),
    }
    for results, value in ((predictions_to_coco([output], [1], {1: 4}), 1.0), ([], 0.0)):
        metrics = score(gt, results)
        for t in ("bbox", "segm"):
            got = [metrics[f"{t}/{m}"] for m in ("AP", "AP50", "AP75", "APs")]
            assert got == pytest.approx([value] * 4)
            assert math.isnan(metrics[f"{t}/APm"]) and math.isnan(metrics[f"{t}/APl"])
    assert "-" in format_metrics(metrics)


def test_only_requested_types_and_quiet(gt: COCO, capsys: pytest.CaptureFixture[str]) -> None:
    results = _gt_results(gt, sorted(gt.getImgIds())[:3])
    metrics = score(gt, results, iou_types=("bbox",))
    assert sorted(metrics) == [f"bbox/{m}" for m in sorted(METRIC_NAMES)]
    assert capsys.readouterr().out == ""
    score(gt, results, iou_types=("segm",), verbose=True)
    assert "Average Precision" in capsys.readouterr().out
    with pytest.raises(ValueError, match="keypoints"):
        score(gt, results, iou_types=("keypoints",))


def test_bad_results_raise(gt: COCO) -> None:
    (result, *_) = _gt_results(gt, [sorted(gt.getImgIds())[-1]])
    with pytest.raises(ValueError, match="image_id 999999"):
        score(gt, [dict(result, image_id=999999)])
    small = mask_utils.encode(np.ones((4, 4, 1), np.uint8, order="F"))[0]
    with pytest.raises(ValueError, match="original size"):
        score(gt, [dict(result, segmentation=small)])
    no_mask = {k: v for k, v in result.items() if k != "segmentation"}
    with pytest.raises(ValueError, match="needs a mask"):
        score(gt, [no_mask])
    assert score(gt, [no_mask], iou_types=("bbox",))["bbox/AP"] > 0


def test_format_metrics() -> None:
    metrics = {key: 0.1 + i / 100 for i, key in enumerate(KEYS)}
    metrics["segm/APl"] = math.nan
    text = format_metrics(metrics)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == list(METRIC_NAMES)
    assert lines[1].split() == ["bbox", "0.100", "0.110", "0.120", "0.130", "0.140", "0.150"]
    assert lines[2].split() == ["segm", "0.160", "0.170", "0.180", "0.190", "0.200", "-"]
    only_bbox = format_metrics({k: v for k, v in metrics.items() if k.startswith("bbox/")})
    assert "segm" not in only_bbox and "0.150" in only_bbox


# ---------------------------------------------------------------------------------------------
# infer with a real (untrained) model


def _decoded_batches(shard_dir: Path, batch_size: int) -> list[tuple[list[Tensor], list[dict]]]:
    from PIL import Image

    from pipeline.data.manifest import iter_records

    samples = []
    for r in iter_records(shard_dir):
        rgb = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        image = (
            torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
        )  # (H, W, 3) -> (3, H, W)
        samples.append((image, {"image_id": torch.tensor(r["image_id"])}))
    return [
        ([s[0] for s in samples[i : i + batch_size]], [s[1] for s in samples[i : i + batch_size]])
        for i in range(0, len(samples), batch_size)
    ]


def test_infer_with_tiny_panet(shard_dir: Path, gt: COCO) -> None:
    from panet_model import PANetConfig, build_panet

    torch.manual_seed(0)
    cfg = PANetConfig.preset("tiny").override(
        # Fewer detections: pasting 100 masks per image at full size dominates the test's time.
        {"transform.min_size": (96,), "transform.max_size": 128, "roi.detections_per_img": 20}
    )
    _, inverse = _label_maps(gt)
    model = build_panet(cfg, num_classes=len(inverse) + 1)
    model.train()
    batches = _decoded_batches(shard_dir, batch_size=2)[:1]  # 2 images: format, not accuracy
    results = infer(model, batches, inverse, "cpu")
    assert model.training  # given back in the mode it came in
    assert results, "an untrained model still outputs low-score detections"
    sizes = {int(t["image_id"]): img.shape[1:] for imgs, ts in batches for img, t in zip(imgs, ts)}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert r["image_id"] in sizes
        assert r["category_id"] in inverse.values()
        assert len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0
        assert 0.0 <= r["score"] <= 1.0
        assert tuple(r["segmentation"]["size"]) == tuple(sizes[r["image_id"]])
        assert mask_utils.decode(r["segmentation"]).shape == tuple(sizes[r["image_id"]])
    metrics = score(gt, results)  # sizes and ids fit the ground truth
    assert sorted(metrics) == sorted(KEYS)
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in metrics.values())


def test_evaluate_single_process(gt: COCO) -> None:
    image_ids = sorted(gt.getImgIds())
    outputs, _ = _gt_outputs(gt, image_ids)
    model = _ReplayModel(dict(zip(image_ids, outputs)))
    batches = [
        ([torch.full((3, 2, 2), float(i))], [{"image_id": torch.tensor(i)}]) for i in image_ids
    ]
    metrics = evaluate(model, batches, gt, _label_maps(gt)[1], "cpu")
    assert metrics == pytest.approx(score(gt, _gt_results(gt)), nan_ok=True)
    assert metrics is not None and metrics["bbox/AP"] == pytest.approx(1.0)
    assert model.training
    with pytest.raises(ValueError, match="ground truth"):
        evaluate(model, batches, None, _label_maps(gt)[1], "cpu")


# ---------------------------------------------------------------------------------------------
# Distributed: gather and evaluate over 2 gloo processes


class _ReplayModel(nn.Module):
    """Returns precomputed outputs for images that carry their image id in every pixel."""

    def __init__(self, outputs: dict[int, dict[str, Tensor]]) -> None:
        super().__init__()
        self.outputs = outputs
        self.weight = nn.Parameter(torch.zeros(1))  # DDP needs a parameter
        self.register_buffer("seen", torch.zeros(1))  # and a buffer it would broadcast

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        assert not self.training
        return [self.outputs[int(image[0, 0, 0])] for image in images]


def _dist_worker(rank: int, port: int, shard_dir: str, out_dir: str) -> None:
    """Spawned process: run every distributed case on this rank, pickle what it saw."""
    torch.set_num_threads(1)  # two processes on a 2-core box
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    seen: dict[str, Any] = {}
    try:
        # Disjoint image ids: rank 0 gets the union.
        mine = [{"image_id": 10 * rank + i, "score": float(rank)} for i in range(3)]
        seen["disjoint"] = gather(mine)
        # An image evaluated on both ranks: every rank raises.
        try:
            gather([{"image_id": 5, "rank": rank}, {"image_id": 100 + rank}])
            seen["overlap"] = "no error"
        except ValueError as e:
            seen["overlap"] = str(e)
        # A rank without any result still takes part.
        seen["empty"] = gather([] if rank else [{"image_id": 1}])
        # The whole composition on perfect outputs, rank 1 without any eval batch (a small eval
        # set on many workers), through a DDP-wrapped model: DDP's first forward after
        # construction or a training step broadcasts buffers, which rank 1 would never join.
        gt = coco_ground_truth(shard_dir)
        image_ids = sorted(gt.getImgIds()) if rank == 0 else []
        outputs, _ = _gt_outputs(gt, image_ids)
        model = nn.parallel.DistributedDataParallel(_ReplayModel(dict(zip(image_ids, outputs))))
        images = [torch.full((3, 2, 2), float(i)) for i in image_ids]
        targets = [{"image_id": i} for i in image_ids]
        batches = [(images[i : i + 2], targets[i : i + 2]) for i in range(0, len(images), 2)]
        gt_arg = gt if rank == 0 else None
        seen["evaluate"] = evaluate(model, batches, gt_arg, _label_maps(gt)[1], "cpu")
        seen["perfect"] = score(gt, _gt_results(gt)) if rank == 0 else None
        seen["gather_group"] = _gather_group_reuse(mine)
        # Tear down together: a rank that destroyed its group and exited while the other was
        # still scoring aborted at exit in gloo ("terminate called without an active exception").
        dist.barrier()
    except BaseException:
        seen["error"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(seen))


def _gather_group_reuse(mine: list[dict[str, Any]]) -> dict[str, Any]:
    """Three gathers as on an NCCL run (the backend's name patched, the groups real gloo)."""
    calls = {"new_group": 0, "destroy_process_group": 0}
    real = {name: getattr(dist, name) for name in (*calls, "get_backend")}

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real[name](*args, **kwargs)

        return call

    for name in calls:
        setattr(dist, name, counted(name))
    dist.get_backend = lambda group=None: "nccl"  # type: ignore[assignment]
    try:
        first = gather_group()  # at worker start
        gathered = [gather(mine) for _ in range(3)]  # three evaluations
        return {**calls, "kept": gather_group() is first, "gathered": gathered}
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_seen(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each rank saw in `_dist_worker`, from one spawn of WORLD_SIZE gloo processes."""
    out_dir = tmp_path_factory.mktemp("dist")
    context = mp.spawn(
        _dist_worker,
        args=(_free_port(), str(shard_dir), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"spawned ranks did not finish within {SPAWN_TIMEOUT_S}s (deadlock?)")
    seen = [pickle.loads((out_dir / f"rank{r}.pkl").read_bytes()) for r in range(WORLD_SIZE)]
    for rank, s in enumerate(seen):
        assert "error" not in s, f"rank {rank}:\n{s['error']}"
    return seen


def test_gather_without_distributed_is_identity() -> None:
    results = [{"image_id": 1}]
    assert gather(results) is results


def test_gather_two_ranks(dist_seen: list[dict[str, Any]]) -> None:
    rank0, rank1 = dist_seen
    assert rank0["disjoint"] == [
        {"image_id": 10 * r + i, "score": float(r)} for r in range(WORLD_SIZE) for i in range(3)
    ]
    assert rank1["disjoint"] is None
    assert rank0["empty"] == [{"image_id": 1}] and rank1["empty"] is None


def test_gather_overlap_raises_on_every_rank(dist_seen: list[dict[str, Any]]) -> None:
    for s in dist_seen:
        assert "image_id 5" in s["overlap"] and "ranks 0 and 1" in s["overlap"]


def test_nccl_gather_group_is_made_once(dist_seen: list[dict[str, Any]]) -> None:
    """On NCCL the objects go over a gloo group made at worker start and kept."""
    for rank, s in enumerate(dist_seen):
        seen = s["gather_group"]
        assert seen["new_group"] == 1 and seen["destroy_process_group"] == 0
        assert seen["kept"]
        assert seen["gathered"] == [dist_seen[0]["disjoint"] if rank == 0 else None] * 3


def test_distributed_evaluate(dist_seen: list[dict[str, Any]]) -> None:
    rank0, rank1 = dist_seen
    assert rank1["evaluate"] is None
    assert rank0["evaluate"] == pytest.approx(rank0["perfect"], nan_ok=True)
    assert rank0["evaluate"]["segm/AP"] == pytest.approx(1.0)
