"""Bytes per image in the shards (by column group) against the source files (JPEG + JSON).

Converts two synthetic COCO sets (160..320 px and 640..1024 px) in a temp dir (removed at the
end) and reads the shards' Parquet footers.

    python benchmarks/data_bytes.py [--quick]

--quick: 500 small and 48 large images; the full run: 5,000 and 256. The last line is one JSON
object with the figures and ratios.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from data_bench import (  # benchmarks/ is on sys.path when run as a script
    Settings,
    converted_sets,
    figures,
    main,
)

from pipeline.data.manifest import load_manifest, shard_paths

QUICK_HELP = "500 small and 48 large images"
# The JSON figures of each set: name -> digits (0: a whole number of bytes).
FIGURES = {
    "shard_bytes_per_image": 0,
    "shard_image_bytes_per_image": 0,
    "shard_annotation_bytes_per_image": 0,
    "shard_other_bytes_per_image": 0,
    "source_bytes_per_image": 0,
    "source_jpeg_bytes_per_image": 0,
    "source_json_bytes_per_image": 0,
    "source_json_share": 4,
    "shard_vs_source_ratio": 3,
}


def bytes_per_image(shard_dir: Path, images: Path, ann_file: Path) -> dict[str, float]:
    """Bytes per image in the shards (by column group) and in the source files."""
    manifest = load_manifest(shard_dir)
    n = sum(s["rows"] for s in manifest["shards"])
    total = image_col = ann_cols = 0
    for path in shard_paths(manifest, shard_dir):
        total += os.path.getsize(path)
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema == "image":
                    image_col += col.total_compressed_size
                elif col.path_in_schema.startswith("annotations"):
                    ann_cols += col.total_compressed_size
    jpeg = sum(p.stat().st_size for p in images.iterdir())
    ann = ann_file.stat().st_size
    return {
        "images": n,
        "shard_bytes_per_image": total / n,
        "shard_image_bytes_per_image": image_col / n,
        "shard_annotation_bytes_per_image": ann_cols / n,
        # other columns, page headers, footer
        "shard_other_bytes_per_image": (total - image_col - ann_cols) / n,
        "source_bytes_per_image": (jpeg + ann) / n,
        "source_jpeg_bytes_per_image": jpeg / n,
        "source_json_bytes_per_image": ann / n,
        "source_json_share": ann / (jpeg + ann),
        "shard_vs_source_ratio": total / (jpeg + ann),
    }


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f} KB" if n >= 1024 else f"{n:,.0f} B"


def print_bytes(sizes: dict[str, dict[str, float]]) -> None:
    print("\nBytes per image: shards vs source files (JPEG + annotation JSON)")
    header = (
        f"{'set':<14}{'source':>11}{'JPEG':>11}{'JSON':>10}{'JSON %':>8}{'shard':>11}"
        f"{'image col':>11}{'ann cols':>10}{'other':>9}{'shard/src':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, b in (("160..320 px", sizes["small"]), ("640..1024 px", sizes["large"])):
        print(
            f"{label:<14}{_kb(b['source_bytes_per_image']):>11}{_kb(b['source_jpeg_bytes_per_image']):>11}"
            f"{_kb(b['source_json_bytes_per_image']):>10}{100 * b['source_json_share']:>7.1f}%"
            f"{_kb(b['shard_bytes_per_image']):>11}{_kb(b['shard_image_bytes_per_image']):>11}"
            f"{_kb(b['shard_annotation_bytes_per_image']):>10}{_kb(b['shard_other_bytes_per_image']):>9}"
            f"{b['shard_vs_source_ratio']:>10.3f}"
        )
    print("other = remaining columns, page headers and footers")


def run(tmp: Path, s: Settings) -> dict[str, Any]:
    (small, small_dir), (large, large_dir) = converted_sets(tmp, s)
    sizes = {
        "small": bytes_per_image(small_dir, small.images, small.annotations),
        "large": bytes_per_image(large_dir, large.images, large.annotations),
    }
    print_bytes(sizes)
    return {**figures("", sizes["small"], FIGURES), **figures("large_", sizes["large"], FIGURES)}


if __name__ == "__main__":
    main(__doc__, QUICK_HELP, run)
