"""A fake converter for the shard writer's tests: item k becomes a 2+k x 3 record, or a problem."""

from __future__ import annotations

import os

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.data.plan import ConversionPlan, ItemResult, fingerprint, skip_entry
from pipeline.data.writer import write_shards

CALLS: list[int] = []  # items converted in this process (the tests below run workers=1)
_RLE = mask_utils.encode(np.asfortranarray(np.eye(2, 3, dtype=np.uint8)))["counts"].decode()


def fake_convert(item: int, ctx: dict) -> ItemResult:
    CALLS.append(item)
    if item in ctx["bad"]:
        return ItemResult(None, [skip_entry("image", f"img{item}.jpg", "undecodable_image", "bad")])
    if item in ctx["boom"]:
        raise RuntimeError(f"boom {item}")
    ann = {"category_id": 1, "bbox": [0, 0, 2, 2], "area": 2.0, "iscrowd": item % 2, "rle": _RLE}
    skipped = []
    if item in ctx["bad_ann"]:
        skipped.append(skip_entry("annotation", f"ann of {item}", "unknown_category", "cat 9"))
    record = {
        "image_id": item,
        "file_name": f"img{item}.jpg",
        "height": 2 + item,
        "width": 3,
        "image": bytes([item]) * 10,
        "annotations": [ann],
    }
    return ItemResult(record, skipped)


def fake_source(item: int, ctx: dict) -> str:
    return f"img{item}.jpg"


def fake_plan(n: int = 10, bad=(), boom=(), bad_ann=(), tag: str = "a") -> ConversionPlan:
    return ConversionPlan(
        name="fake",
        source={"format": "fake", "tag": tag},
        categories=[{"id": 1, "name": "thing", "color": [1, 2, 3]}],
        items=list(range(n)),
        convert_item=fake_convert,
        item_source=fake_source,
        context={"bad": set(bad), "boom": set(boom), "bad_ann": set(bad_ann)},
        fingerprint=fingerprint("fake", n, tag),
    )


def write_fake(plan, out, **kw):
    kw.setdefault("shard_size", 3)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return write_shards(plan, out, **kw)


def file_stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


class Kill(Exception):
    pass


def kill_after(k):
    def hook(index):
        if index == k:
            raise Kill(f"killed after shard {index}")

    return hook
