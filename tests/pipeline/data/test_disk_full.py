"""A full disk under `panet data convert`: a clear error naming the file, then `--resume`
finishes the conversion with nothing lost (the same shards as a conversion that never stopped).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as panet
from pipeline.data.synth import write_synthetic
from tests.disk import grow, small_disk

PAGE = 4096  # tmpfs charges whole pages


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`panet data convert coco` arguments for 12 small synthetic images."""
    root = tmp_path_factory.mktemp("raw")
    write_synthetic("coco", 12, 0, root, min_size=96, max_size=128)
    ann = root / "annotations" / "instances_train.json"
    return ["--annotations", str(ann), "--images", str(root / "images" / "train")]


def convert(coco: list[str], out: Path, *extra: str) -> int:
    args = ["data", "convert", "coco", *coco, "--out", str(out), "--shard-size", "3"]
    return panet([*args, "--workers", "1", "--quiet", *extra])


@pytest.fixture(scope="module")
def reference(coco: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The manifest of a conversion that was never interrupted (4 shards)."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    assert convert(coco, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bytes"] = {s["path"]: (out / s["path"]).stat().st_size for s in manifest["shards"]}
    return manifest


def shard_list(manifest: dict) -> list[tuple]:
    return [(s["path"], s["rows"], s["sha256"]) for s in manifest["shards"]]


def check_stopped_then_resumed(coco: list[str], out: Path, reference: dict, err: str) -> None:
    """The failed run named the shard and kept what was done; `--resume` finishes the same set."""
    assert "no space left on device" in err and "shard-00002.parquet" in err, err
    assert str(out) in err and "--resume" in err
    assert not (out / "manifest.json").exists()  # not complete, and not shown as complete
    kept = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    assert kept == ["shard-00000.parquet", "shard-00001.parquet"]  # no half shard, no temp file
    assert convert(coco, out, "--resume") == 0
    assert shard_list(json.loads((out / "manifest.json").read_text())) == shard_list(reference)


def test_a_full_disk_stops_the_conversion_and_resume_finishes_it(
    coco: list[str], reference: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = [-(-reference["bytes"][f"shard-0000{k}.parquet"] // PAGE) for k in range(3)]
    # Room for shards 0 and 1, run.json, their done markers and part of shard 2.
    size = (pages[0] + pages[1] + 4 + pages[2] // 2) * PAGE
    with small_disk(tmp_path / "disk", size) as disk:
        out = disk / "shards"
        assert convert(coco, out) == 2
        grow(disk, 16 * size)  # space freed
        check_stopped_then_resumed(coco, out, reference, capsys.readouterr().err)


def test_an_injected_enospc_stops_the_conversion_and_resume_finishes_it(
    coco: list[str],
    reference: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same where no tmpfs can be mounted: the third shard's Parquet write fails."""
    write_table, calls = pq.ParquetWriter.write_table, []

    def full_disk(self: pq.ParquetWriter, table, *args, **kwargs) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_table(self, table, *args, **kwargs)

    out = tmp_path / "shards"
    with monkeypatch.context() as m:
        m.setattr(pq.ParquetWriter, "write_table", full_disk)
        assert convert(coco, out) == 2
    check_stopped_then_resumed(coco, out, reference, capsys.readouterr().err)
