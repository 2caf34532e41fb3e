"""The shard record contract: one Parquet row per image, masks as compressed COCO RLE.

See DESIGN.md "Contracts". Every converter writes rows of `RECORD_SCHEMA`, and every reader
checks a shard directory's manifest against `FORMAT_VERSION` before touching a row.
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

ANNOTATION_TYPE = pa.struct(
    [
        ("category_id", pa.int32()),  # contiguous-or-not dataset category id, as in the manifest
        ("bbox", pa.list_(pa.float32(), 4)),  # COCO [x, y, w, h] in pixels of the original image
        ("area", pa.float32()),  # mask area in pixels
        ("iscrowd", pa.uint8()),  # 1: crowd region, excluded from training targets
        ("rle", pa.string()),  # compressed COCO RLE counts at (height, width)
    ]
)

RECORD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),  # path relative to the source image root
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),  # the original encoded bytes (JPEG/PNG), never re-encoded
        ("annotations", pa.list_(ANNOTATION_TYPE)),
    ]
)
