"""One prediction row per image, and the files they end up in.

A row (`PREDICTION_SCHEMA`) holds an image's id, name, size, the factor the model resized it
by, its detections in COCO form (`[x, y, w, h]` boxes, dataset category ids, compressed RLE
masks) or the reason it was skipped. The plain loop and the Ray Data actors both make rows with
`predict_item`, and `ResultWriter` turns them into `results.json` (COCO results format),
`images.json` and, for batch inference, Parquet.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.predict.images import ImageError, Item, decode, read_bytes
from pipeline.predict.predictor import Predictor
from pipeline.tracking.pictures import detection_figure

PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("error", pa.string()),  # why the image was skipped; "" if it was predicted
        ("scale", pa.float64()),  # the model's resize factor (Predictor.input_scale); 0: skipped
        ("bboxes", pa.list_(pa.list_(pa.float64()))),  # COCO [x, y, w, h] per detection
        ("scores", pa.list_(pa.float64())),
        ("category_ids", pa.list_(pa.int64())),  # the dataset's category ids
        ("rles", pa.list_(pa.string())),  # compressed COCO RLE counts at (height, width)
    ]
)
RESULTS_FILE = "results.json"
IMAGES_FILE = "images.json"
# An image the model upscales more than this is far below the sizes it was trained and tested
# at: its features come from interpolated pixels unlike anything it learned from, yet it still
# returns confident detections, so the user is told.
MAX_UPSCALE = 4.0


def picture_name(image_id: int, name: str) -> str:
    return f"{image_id}_{Path(name).stem or 'image'}.png"


def predict_item(predictor: Predictor, item: Item, pictures: Path | None = None) -> dict[str, Any]:
    """Decode and predict one image; an unreadable one gives a row with its `error`.

    Args:
        predictor: the loaded model.
        item: the image.
        pictures: a folder to draw the detections into (`picture_name`), or None.

    Returns:
        One row of `PREDICTION_SCHEMA` as a dict.
    """
    row: dict[str, Any] = {
        "image_id": item.image_id,
        "file_name": item.name,
        "height": 0,
        "width": 0,
        "error": "",
        "scale": 0.0,
        "bboxes": [],
        "scores": [],
        "category_ids": [],
        "rles": [],
    }
    try:
        rgb = decode(read_bytes(item), item.name)
    except ImageError as err:
        row["error"] = str(err)
        return row
    detections = predictor.predict(rgb)
    results = predictor.coco_results(detections, item.image_id)
    row.update(
        height=rgb.shape[0],
        width=rgb.shape[1],
        scale=predictor.input_scale(rgb.shape[0], rgb.shape[1]),
        bboxes=[r["bbox"] for r in results],
        scores=[r["score"] for r in results],
        category_ids=[r["category_id"] for r in results],
        rles=[r["segmentation"]["counts"] for r in results],
    )
    if pictures is not None:
        drawn = {
            "boxes": detections.boxes,
            "labels": detections.category_ids,
            "scores": detections.scores,
            "masks": detections.masks,
        }
        detection_figure(
            rgb,
            drawn,
            predictor.categories,
            pictures / picture_name(item.image_id, item.name),
            title=Path(item.name).name,
        )
    return row


def row_results(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The COCO result dicts of a row."""
    size = [int(row["height"]), int(row["width"])]
    return [
        {
            "image_id": int(row["image_id"]),
            "category_id": int(cat),
            "bbox": [float(v) for v in bbox],
            "score": float(score),
            "segmentation": {"size": size, "counts": rle},
        }
        for bbox, score, cat, rle in zip(
            row["bboxes"], row["scores"], row["category_ids"], row["rles"]
        )
    ]


class ResultWriter:
    """Collects rows; writes results.json, images.json and (optionally) Parquet into `out`.

    Prints a progress line with the throughput every `every` images and after the last, and
    on stderr, as they come, each skipped image and each image the model upscales more than
    `MAX_UPSCALE`, by id and name.
    """

    def __init__(
        self,
        out: Path,
        categories: Mapping[int, str],
        total: int,
        *,
        parquet: bool = False,
        every: int = 10,
    ) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.categories = dict(categories)
        self.total, self.every = total, every
        self.results: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.upscaled = 0
        self.start = time.perf_counter()
        self.done = 0
        self._first: tuple[float, int] | None = None  # (time, images) of the first rows
        self._writer: Any = None
        if parquet:
            (self.out / "predictions").mkdir(exist_ok=True)
            self._writer = pq.ParquetWriter(
                self.out / "predictions" / "part-0.parquet", PREDICTION_SCHEMA
            )

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if self._first is None and rows:
            self._first = (time.perf_counter(), len(rows))
        if self._writer is not None and rows:
            self._writer.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA))
        for row in rows:
            self.done += 1
            if row["error"]:
                self._skip(row)
            else:
                self._keep(row)
            if self.done % self.every == 0 or self.done == self.total:
                print(f"[predict] {self.progress()}", flush=True)

    def _skip(self, row: Mapping[str, Any]) -> None:
        image_id = int(row["image_id"])
        self.skipped.append({"id": image_id, "file_name": row["file_name"], "reason": row["error"]})
        # The id stays unused: ids are input positions, the same with --ray and on a re-run.
        print(f"[predict] skipped image {image_id}: {row['error']}", file=sys.stderr, flush=True)

    def _keep(self, row: Mapping[str, Any]) -> None:
        height, width, scale = int(row["height"]), int(row["width"]), float(row["scale"])
        self.images.append(
            {
                "id": int(row["image_id"]),
                "file_name": row["file_name"],
                "height": height,
                "width": width,
                "scale": round(scale, 4),
            }
        )
        self.results += row_results(row)
        if scale > MAX_UPSCALE:
            self.upscaled += 1
            print(
                f"[predict] warning: image {row['image_id']} ({row['file_name']}) is "
                f"{width}x{height}, far below the model's input size: the model upscales it "
                f"{scale:.3g}x to {int(width * scale)}x{int(height * scale)}, as it would in "
                "training, so its detections are unreliable",
                file=sys.stderr,
                flush=True,
            )

    @property
    def images_per_s(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def progress(self) -> str:
        return (
            f"{self.done}/{self.total} images read: {len(self.images)} predicted, "
            f"{len(self.skipped)} skipped, {len(self.results)} detections, "
            f"{self.images_per_s:.2f} images/s"
        )

    def close(self) -> dict[str, Any]:
        """Write the JSON files.

        Returns:
            {"images" (predicted), "detections", "skipped", "upscaled" (images the model
            upscaled more than `MAX_UPSCALE`), "seconds", "images_per_s", and
            "steady_images_per_s": the rate after the first rows arrived}.
        """
        if self._writer is not None:
            self._writer.close()
        self.results.sort(key=lambda r: (r["image_id"], -r["score"]))
        self.images.sort(key=lambda i: i["id"])
        (self.out / RESULTS_FILE).write_text(json.dumps(self.results))
        categories = [{"id": k, "name": v} for k, v in self.categories.items()]
        meta = {"images": self.images, "categories": categories, "skipped": self.skipped}
        (self.out / IMAGES_FILE).write_text(json.dumps(meta, indent=1))
        end = time.perf_counter()
        steady = 0.0
        if self._first is not None and self.done > self._first[1]:
            # Past the first rows: without the start-up (model load, Ray actors, first batch).
            steady = (self.done - self._first[1]) / max(end - self._first[0], 1e-9)
        return {
            "images": len(self.images),
            "detections": len(self.results),
            "skipped": len(self.skipped),
            "upscaled": self.upscaled,
            "seconds": end - self.start,
            "images_per_s": self.images_per_s,
            "steady_images_per_s": steady,
        }
