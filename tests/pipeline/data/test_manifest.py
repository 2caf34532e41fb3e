"""Reading a shard directory: load_manifest's checks and the record schema comparison."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.manifest import load_manifest, schema_mismatch
from pipeline.data.records import FORMAT_VERSION, MANIFEST_NAME, RECORD_SCHEMA
from tests.pipeline.data.fake_conversion import fake_plan, write_fake


def _shard_table(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def test_load_manifest_rejects_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        load_manifest(tmp_path)
    out = tmp_path / "out"
    write_fake(fake_plan(4), out)
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
    write_fake(fake_plan(4), out)
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
