"""Shard writer, manifest, resume, load_manifest, inspect/verify, progress (pipeline.data.shards)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pipeline.data import shards
from pipeline.data.progress import Progress, format_duration
from pipeline.data.records import FORMAT_VERSION, MANIFEST_NAME, RECORD_SCHEMA
from pipeline.data.shards import (
    BadRecordError,
    ConversionPlan,
    DataError,
    ItemResult,
    inspect_shards,
    load_manifest,
    schema_mismatch,
    shard_paths,
    skip_entry,
    write_shards,
)

CALLS: list[int] = []  # items converted in this process (the tests below run workers=1)
_RLE = mask_utils.encode(np.asfortranarray(np.eye(2, 3, dtype=np.uint8)))["counts"].decode()


def _fake_convert(item: int, ctx: dict) -> ItemResult:
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


def _source(item: int, ctx: dict) -> str:
    return f"img{item}.jpg"


def _plan(n: int = 10, bad=(), boom=(), bad_ann=(), tag: str = "a") -> ConversionPlan:
    return ConversionPlan(
        name="fake",
        source={"format": "fake", "tag": tag},
        categories=[{"id": 1, "name": "thing", "color": [1, 2, 3]}],
        items=list(range(n)),
        convert_item=_fake_convert,
        item_source=_source,
        context={"bad": set(bad), "boom": set(boom), "bad_ann": set(bad_ann)},
        fingerprint=shards.fingerprint("fake", n, tag),
    )


def _write(plan, out, **kw):
    kw.setdefault("shard_size", 3)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return write_shards(plan, out, **kw)


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


class Kill(Exception):
    pass


def _kill_after(k):
    def hook(index):
        if index == k:
            raise Kill(f"killed after shard {index}")

    return hook


def test_write_manifest_and_read_back(tmp_path):
    out = tmp_path / "out"
    manifest = _write(_plan(10, bad=[4], bad_ann=[7]), out)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["complete"] is True
    assert [s["rows"] for s in manifest["shards"]] == [3, 2, 3, 1]
    assert [s["path"] for s in manifest["shards"]] == [f"shard-0000{k}.parquet" for k in range(4)]
    # Deterministic assignment by input order: the skipped item 4 leaves a hole in shard 1 only.
    tables = [pq.read_table(p) for p in shard_paths(manifest, out)]
    assert [t.column("image_id").to_pylist() for t in tables] == [[0, 1, 2], [3, 5], [6, 7, 8], [9]]
    assert all(t.schema.equals(RECORD_SCHEMA) for t in tables)
    for s in manifest["shards"]:
        assert shards.sha256_file(out / s["path"]) == s["sha256"]
    assert manifest["categories"] == [{"id": 1, "name": "thing", "color": [1, 2, 3]}]
    # Items 0..9 without 4: odd ones are crowd regions.
    assert manifest["instance_counts"] == {"1": 4} and manifest["crowd_counts"] == {"1": 5}
    assert manifest["image_size"] == {
        "min_height": 2,
        "max_height": 11,
        "min_width": 3,
        "max_width": 3,
    }
    t = manifest["totals"]
    assert (t["images"], t["records"], t["shards"]) == (10, 9, 4)
    assert (t["skipped_images"], t["skipped_annotations"]) == (1, 1)
    assert manifest["skipped"] == [
        {"source": "img4.jpg", "reason": "bad", "kind": "image", "code": "undecodable_image"},
        {"source": "ann of 7", "reason": "cat 9", "kind": "annotation", "code": "unknown_category"},
    ]
    assert load_manifest(out) == json.loads((out / MANIFEST_NAME).read_text())
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in shard_paths(manifest, out))
    # Nothing but shards and the manifest is visible to dataset discovery.
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith(("_", ".")))
    assert visible == [MANIFEST_NAME] + [s["path"] for s in manifest["shards"]]


def test_same_input_gives_identical_shards(tmp_path):
    a = _write(_plan(7), tmp_path / "a")
    b = _write(_plan(7), tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_shard_with_only_skipped_images_has_no_file(tmp_path):
    manifest = _write(_plan(9, bad=[3, 4, 5]), tmp_path / "out")
    assert [s["path"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00002.parquet"]
    assert not (tmp_path / "out" / "shard-00001.parquet").exists()


def test_unexpected_converter_error_is_reported_not_fatal(tmp_path):
    manifest = _write(_plan(4, boom=[2]), tmp_path / "out")
    assert manifest["totals"]["records"] == 3
    assert manifest["skipped"] == [
        {"source": "img2.jpg", "reason": "RuntimeError: boom 2", "kind": "image", "code": "error"}
    ]


def test_resume_after_kill_redoes_only_unfinished_shards(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Kill):
        _write(_plan(10), out, on_shard_done=_kill_after(1))
    assert not (out / MANIFEST_NAME).exists()  # a partial output never looks complete
    done = {k: _stat(out / f"shard-0000{k}.parquet") for k in (0, 1)}
    with pytest.raises(DataError, match="unfinished.*--resume"):
        _write(_plan(10), out)
    with pytest.raises(DataError, match="unfinished"):
        load_manifest(out)
    CALLS.clear()
    manifest = _write(_plan(10), out, resume=True)
    assert CALLS == [6, 7, 8, 9]  # shards 0 and 1 were not converted again
    assert {k: _stat(out / f"shard-0000{k}.parquet") for k in (0, 1)} == done
    assert manifest["totals"]["records"] == 10
    assert load_manifest(out)["shards"] == manifest["shards"]


def test_resume_after_losing_manifest_and_a_shard(tmp_path):
    out = tmp_path / "out"
    first = _write(_plan(10), out)
    (out / MANIFEST_NAME).unlink()
    (out / "shard-00002.parquet").unlink()
    kept = {k: _stat(out / f"shard-0000{k}.parquet") for k in (0, 1, 3)}
    CALLS.clear()
    second = _write(_plan(10), out, resume=True)
    assert CALLS == [6, 7, 8]
    assert {k: _stat(out / f"shard-0000{k}.parquet") for k in (0, 1, 3)} == kept
    assert second["shards"] == first["shards"]  # the redone shard is byte-identical


def test_resume_redoes_a_corrupted_shard(tmp_path):
    out = tmp_path / "out"
    _write(_plan(10), out)
    path = out / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    CALLS.clear()
    manifest = _write(_plan(10), out, resume=True)
    assert CALLS == [3, 4, 5]
    assert shards.sha256_file(path) == manifest["shards"][1]["sha256"]


def test_output_directory_guards(tmp_path):
    out = tmp_path / "out"
    _write(_plan(4), out)
    with pytest.raises(DataError, match="complete conversion.*--resume.*new directory"):
        _write(_plan(4), out)
    with pytest.raises(DataError, match="other input or settings.*shard_size"):
        _write(_plan(4), out, shard_size=2, resume=True)
    with pytest.raises(DataError, match="other input or settings.*input files"):
        _write(_plan(4, tag="b"), out, resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no conversion"):
        _write(_plan(4), foreign)
    with pytest.raises(DataError, match="not empty and holds no conversion"):
        _write(_plan(4), foreign, resume=True)
    with pytest.raises(DataError, match="not a directory"):
        _write(_plan(4), foreign / "notes.txt")
    with pytest.raises(DataError, match="shard-size"):
        _write(_plan(4), tmp_path / "x", shard_size=0)
    # --resume on a complete directory checks it and rewrites the same manifest.
    assert _write(_plan(4), out, resume=True)["shards"] == load_manifest(out)["shards"]


def test_manifest_is_written_last_and_atomically(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", spy)
    out = tmp_path / "out"
    _write(_plan(7), out)
    src, dst = replaced[-1]
    assert dst == os.fspath(out / MANIFEST_NAME)
    assert os.path.dirname(src) == os.fspath(out) and src != dst  # temp file renamed in place
    assert sum(d.endswith(".parquet") for _, d in replaced[:-1]) == 3
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_strict_fails_on_first_bad_record_and_keeps_finished_shards(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BadRecordError, match=r"img7\.jpg: bad \[undecodable_image\]"):
        _write(_plan(10, bad=[7]), out, strict=True)
    assert (out / "shard-00000.parquet").exists() and (out / "shard-00001.parquet").exists()
    assert not (out / "shard-00002.parquet").exists() and not (out / MANIFEST_NAME).exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    with pytest.raises(BadRecordError, match="ann of 1: cat 9"):
        _write(_plan(10, bad_ann=[1]), tmp_path / "out2", strict=True)
    manifest = _write(_plan(10, bad=[7]), out, resume=True)  # not strict: skip and finish
    assert manifest["totals"]["records"] == 9


def _shard_table(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def test_load_manifest_rejects_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        load_manifest(tmp_path)
    out = tmp_path / "out"
    _write(_plan(4), out)
    path = out / MANIFEST_NAME
    good = json.loads(path.read_text())

    def rewrite(**changes):
        path.write_text(json.dumps({**good, **changes}))

    rewrite(complete=False)
    with pytest.raises(ValueError, match=f"{out}.*incomplete"):
        load_manifest(out)
    rewrite(format_version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="format_version"):
        load_manifest(out)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_manifest(out)
    no_shards = {k: v for k, v in good.items() if k != "shards"}
    path.write_text(json.dumps(no_shards))
    with pytest.raises(ValueError, match="incomplete.*shards"):
        load_manifest(out)
    rewrite()
    (out / "shard-00001.parquet").unlink()
    with pytest.raises(ValueError, match="shard-00001.parquet.*missing"):
        load_manifest(out)


@pytest.mark.parametrize(
    "field_name, new_type, message",
    [
        ("image", None, "field 'image' is missing"),
        ("annotations.bbox", pa.list_(pa.float64()), "field 'annotations.bbox' has type"),
        ("annotations.rle", None, "field 'annotations.rle' is missing"),
        ("height", pa.int64(), "field 'height' has type int64"),
    ],
)
def test_load_manifest_names_shard_and_field_of_a_schema_mismatch(
    tmp_path, field_name, new_type, message
):
    out = tmp_path / "out"
    _write(_plan(4), out)
    table = pq.read_table(out / "shard-00001.parquet")
    rows = table.to_pylist()
    top, _, child = field_name.partition(".")
    if child:
        ann_fields = [f for f in RECORD_SCHEMA.field("annotations").type.value_type]
        ann_fields = [
            (f.name, new_type if f.name == child else f.type)
            for f in ann_fields
            if not (f.name == child and new_type is None)
        ]
        schema = RECORD_SCHEMA.set(
            RECORD_SCHEMA.get_field_index("annotations"),
            pa.field("annotations", pa.list_(pa.struct(ann_fields))),
        )
        for r in rows:
            for a in r["annotations"]:
                if new_type is None:
                    del a[child]
    elif new_type is None:
        schema = RECORD_SCHEMA.remove(RECORD_SCHEMA.get_field_index(top))
        for r in rows:
            del r[top]
    else:
        schema = RECORD_SCHEMA.set(RECORD_SCHEMA.get_field_index(top), pa.field(top, new_type))
    pq.write_table(_shard_table(schema, rows), out / "shard-00001.parquet")
    with pytest.raises(ValueError, match=f"shard-00001.parquet: {message}"):
        load_manifest(out)


def test_schema_mismatch_accepts_extra_fields():
    extra = RECORD_SCHEMA.append(pa.field("source_id", pa.string()))
    assert schema_mismatch(extra) is None
    assert schema_mismatch(RECORD_SCHEMA) is None


def test_inspect_and_verify(tmp_path):
    out = tmp_path / "out"
    _write(_plan(10, bad=[4], bad_ann=[7]), out)
    report = inspect_shards(out)
    assert report["shards"] == 4 and report["totals"]["records"] == 9
    assert report["categories"] == [{"id": 1, "name": "thing", "instances": 4, "crowd": 5}]
    assert report["bytes_on_disk"] == sum(p.stat().st_size for p in out.glob("*.parquet"))
    assert [(g["kind"], g["code"], g["count"]) for g in report["skipped_groups"]] == [
        ("annotation", "unknown_category", 1),
        ("image", "undecodable_image", 1),
    ]
    text = shards.format_inspect(report)
    assert "thing" in text and "undecodable_image" in text and "height 2..11" in text
    assert inspect_shards(out, verify=True)["problems"] == []

    path = out / "shard-00002.parquet"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    problems = inspect_shards(out, verify=True)["problems"]
    assert problems and all(p.startswith("shard-00002.parquet: ") for p in problems)
    assert "sha256 mismatch" in problems[0]
    assert "FAILED" in shards.format_inspect(inspect_shards(out, verify=True))

    # A row count that disagrees with the manifest is found even when the bytes hash right.
    _write(_plan(4), tmp_path / "rows")
    manifest = json.loads((tmp_path / "rows" / MANIFEST_NAME).read_text())
    manifest["shards"][0]["rows"] = 99
    (tmp_path / "rows" / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert inspect_shards(tmp_path / "rows", verify=True)["problems"] == [
        "shard-00000.parquet: 3 rows, manifest says 99"
    ]


def test_progress_is_throttled_and_shows_rate_and_eta():
    now = [0.0]
    stream = io.StringIO()
    prog = Progress(100, label="convert x", interval=2.0, stream=stream, clock=lambda: now[0])
    for t, done in [(0.5, 5), (1.0, 10), (2.5, 25), (3.0, 30), (5.0, 50)]:
        now[0] = t
        prog.update(done)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "convert x: 25/100 images (25.0%), 10.0 images/s, ETA 0:00:08",
        "convert x: 50/100 images (50.0%), 10.0 images/s, ETA 0:00:05",
    ]
    resumed = Progress(100, label="r", initial=50, stream=io.StringIO(), clock=lambda: now[0])
    now[0] += 5
    resumed.update(10)
    assert "60/100" in resumed.line() and "2.0 images/s" in resumed.line()
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"


def test_conversion_prints_summary_to_stream(tmp_path):
    stream = io.StringIO()
    _write(_plan(5, bad=[1]), tmp_path / "out", progress=True, stream=stream)
    text = stream.getvalue()
    assert "convert fake: 4 records" in text and "in 2 shards" in text
    assert "1 x image undecodable_image, e.g. img1.jpg: bad" in text
