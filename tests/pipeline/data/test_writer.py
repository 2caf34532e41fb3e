"""The shard writer: shards, manifest, resume, guards, strict mode, progress and summary."""

from __future__ import annotations

import io
import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline.data import writer
from pipeline.data.manifest import DataError, load_manifest, sha256_file, shard_paths
from pipeline.data.plan import BadRecordError
from pipeline.data.progress import Progress, format_duration
from pipeline.data.records import FORMAT_VERSION, MANIFEST_NAME, RECORD_SCHEMA
from tests.pipeline.data.fake_conversion import (
    CALLS,
    Kill,
    fake_plan,
    file_stat,
    kill_after,
    write_fake,
)


def test_write_manifest_and_read_back(tmp_path):
    out = tmp_path / "out"
    manifest = write_fake(fake_plan(10, bad=[4], bad_ann=[7]), out)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["complete"] is True
    assert [s["rows"] for s in manifest["shards"]] == [3, 2, 3, 1]
    assert [s["path"] for s in manifest["shards"]] == [f"shard-0000{k}.parquet" for k in range(4)]
    # Deterministic assignment by input order: the skipped item 4 leaves a hole in shard 1 only.
    tables = [pq.read_table(p) for p in shard_paths(manifest, out)]
    assert [t.column("image_id").to_pylist() for t in tables] == [[0, 1, 2], [3, 5], [6, 7, 8], [9]]
    assert all(t.schema.equals(RECORD_SCHEMA) for t in tables)
    for s in manifest["shards"]:
        assert sha256_file(out / s["path"]) == s["sha256"]
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
    a = write_fake(fake_plan(7), tmp_path / "a")
    b = write_fake(fake_plan(7), tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_shard_with_only_skipped_images_has_no_file(tmp_path):
    manifest = write_fake(fake_plan(9, bad=[3, 4, 5]), tmp_path / "out")
    assert [s["path"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00002.parquet"]
    assert not (tmp_path / "out" / "shard-00001.parquet").exists()


def test_unexpected_converter_error_is_reported_not_fatal(tmp_path):
    manifest = write_fake(fake_plan(4, boom=[2]), tmp_path / "out")
    assert manifest["totals"]["records"] == 3
    assert manifest["skipped"] == [
        {"source": "img2.jpg", "reason": "RuntimeError: boom 2", "kind": "image", "code": "error"}
    ]


def test_resume_after_kill_redoes_only_unfinished_shards(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Kill):
        write_fake(fake_plan(10), out, on_shard_done=kill_after(1))
    assert not (out / MANIFEST_NAME).exists()  # a partial output never looks complete
    done = {k: file_stat(out / f"shard-0000{k}.parquet") for k in (0, 1)}
    with pytest.raises(DataError, match="unfinished.*--resume"):
        write_fake(fake_plan(10), out)
    with pytest.raises(DataError, match="unfinished"):
        load_manifest(out)
    CALLS.clear()
    manifest = write_fake(fake_plan(10), out, resume=True)
    assert CALLS == [6, 7, 8, 9]  # shards 0 and 1 were not converted again
    assert {k: file_stat(out / f"shard-0000{k}.parquet") for k in (0, 1)} == done
    assert manifest["totals"]["records"] == 10
    assert load_manifest(out)["shards"] == manifest["shards"]


def test_resume_after_losing_manifest_and_a_shard(tmp_path):
    out = tmp_path / "out"
    first = write_fake(fake_plan(10), out)
    (out / MANIFEST_NAME).unlink()
    (out / "shard-00002.parquet").unlink()
    kept = {k: file_stat(out / f"shard-0000{k}.parquet") for k in (0, 1, 3)}
    CALLS.clear()
    second = write_fake(fake_plan(10), out, resume=True)
    assert CALLS == [6, 7, 8]
    assert {k: file_stat(out / f"shard-0000{k}.parquet") for k in (0, 1, 3)} == kept
    assert second["shards"] == first["shards"]  # the redone shard is byte-identical


def test_resume_redoes_a_corrupted_shard(tmp_path):
    out = tmp_path / "out"
    write_fake(fake_plan(10), out)
    path = out / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    CALLS.clear()
    manifest = write_fake(fake_plan(10), out, resume=True)
    assert CALLS == [3, 4, 5]
    assert sha256_file(path) == manifest["shards"][1]["sha256"]


def test_output_directory_guards(tmp_path):
    out = tmp_path / "out"
    write_fake(fake_plan(4), out)
    with pytest.raises(DataError, match="complete conversion.*--resume.*new directory"):
        write_fake(fake_plan(4), out)
    with pytest.raises(DataError, match="other input or settings.*shard_size"):
        write_fake(fake_plan(4), out, shard_size=2, resume=True)
    with pytest.raises(DataError, match="other input or settings.*input files"):
        write_fake(fake_plan(4, tag="b"), out, resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no conversion"):
        write_fake(fake_plan(4), foreign)
    with pytest.raises(DataError, match="not empty and holds no conversion"):
        write_fake(fake_plan(4), foreign, resume=True)
    with pytest.raises(DataError, match="not a directory"):
        write_fake(fake_plan(4), foreign / "notes.txt")
    with pytest.raises(DataError, match="shard-size"):
        write_fake(fake_plan(4), tmp_path / "x", shard_size=0)
    # --resume on a complete directory checks it and rewrites the same manifest.
    assert write_fake(fake_plan(4), out, resume=True)["shards"] == load_manifest(out)["shards"]


def test_manifest_is_written_last_and_atomically(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", spy)
    out = tmp_path / "out"
    write_fake(fake_plan(7), out)
    src, dst = replaced[-1]
    assert dst == os.fspath(out / MANIFEST_NAME)
    assert os.path.dirname(src) == os.fspath(out) and src != dst  # temp file renamed in place
    assert sum(d.endswith(".parquet") for _, d in replaced[:-1]) == 3
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_strict_fails_on_first_bad_record_and_keeps_finished_shards(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BadRecordError, match=r"img7\.jpg: bad \[undecodable_image\]"):
        write_fake(fake_plan(10, bad=[7]), out, strict=True)
    assert (out / "shard-00000.parquet").exists() and (out / "shard-00001.parquet").exists()
    assert not (out / "shard-00002.parquet").exists() and not (out / MANIFEST_NAME).exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    with pytest.raises(BadRecordError, match="ann of 1: cat 9"):
        write_fake(fake_plan(10, bad_ann=[1]), tmp_path / "out2", strict=True)
    manifest = write_fake(fake_plan(10, bad=[7]), out, resume=True)  # not strict: skip and finish
    assert manifest["totals"]["records"] == 9


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
    write_fake(fake_plan(5, bad=[1]), tmp_path / "out", progress=True, stream=stream)
    text = stream.getvalue()
    assert "convert fake: 4 records" in text and "in 2 shards" in text
    assert "1 x image undecodable_image, e.g. img1.jpg: bad" in text
