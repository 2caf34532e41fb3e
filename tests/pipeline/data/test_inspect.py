"""`panet data inspect`'s report, and --verify finding a changed shard or row count."""

from __future__ import annotations

import json

from pipeline.data.inspect import format_inspect, inspect_shards
from pipeline.data.records import MANIFEST_NAME
from tests.pipeline.data.fake_conversion import fake_plan, write_fake


def test_inspect_and_verify(tmp_path):
    out = tmp_path / "out"
    write_fake(fake_plan(10, bad=[4], bad_ann=[7]), out)
    report = inspect_shards(out)
    assert report["shards"] == 4 and report["totals"]["records"] == 9
    assert report["categories"] == [{"id": 1, "name": "thing", "instances": 4, "crowd": 5}]
    assert report["bytes_on_disk"] == sum(p.stat().st_size for p in out.glob("*.parquet"))
    assert [(g["kind"], g["code"], g["count"]) for g in report["skipped_groups"]] == [
        ("annotation", "unknown_category", 1),
        ("image", "undecodable_image", 1),
    ]
    text = format_inspect(report)
    assert "thing" in text and "undecodable_image" in text and "height 2..11" in text
    assert inspect_shards(out, verify=True)["problems"] == []

    path = out / "shard-00002.parquet"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    problems = inspect_shards(out, verify=True)["problems"]
    assert problems and all(p.startswith("shard-00002.parquet: ") for p in problems)
    assert "sha256 mismatch" in problems[0]
    assert "FAILED" in format_inspect(inspect_shards(out, verify=True))

    # A row count that disagrees with the manifest is found even when the bytes hash right.
    write_fake(fake_plan(4), tmp_path / "rows")
    manifest = json.loads((tmp_path / "rows" / MANIFEST_NAME).read_text())
    manifest["shards"][0]["rows"] = 99
    (tmp_path / "rows" / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert inspect_shards(tmp_path / "rows", verify=True)["problems"] == [
        "shard-00000.parquet: 3 rows, manifest says 99"
    ]
