"""`panet data ...` through `pipeline.cli.main`: help, convert, inspect/verify, errors, synth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data import cli as data_cli
from pipeline.data import shards

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "datumaro"
COCO_DIR = FIXTURES / "coco_dataset" / "coco_instances"
VAL_ARGS = [
    "--annotations",
    str(COCO_DIR / "annotations" / "instances_val.json"),
    "--images",
    str(COCO_DIR / "images" / "val"),
]


@pytest.mark.parametrize(
    "argv",
    [
        ["data"],
        ["data", "synth"],
        ["data", "convert"],
        ["data", "convert", "coco"],
        ["data", "convert", "mvd"],
        ["data", "convert", "cityscapes"],
        ["data", "inspect"],
    ],
)
def test_every_sub_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: panet data" in capsys.readouterr().out


def test_default_shard_size_matches_the_writer():
    assert data_cli.DEFAULT_SHARD_SIZE == shards.DEFAULT_SHARD_SIZE


def test_convert_inspect_verify(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "convert", "coco", *VAL_ARGS, "--out", str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "convert coco: 1 records (1 instances, 1 crowd)" in err and "skipped nothing" in err

    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "records: 1 of 1 images" in text and "height 10..10, width 5..5" in text
    assert main(["data", "inspect", str(out), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    assert main(["data", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["records"] == 1

    shard = out / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["data", "inspect", str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "verify failed: shard-00000.parquet: sha256 mismatch" in err


def test_convert_mvd_and_cityscapes(tmp_path, capsys):
    mvd = FIXTURES / "mapillary_vistas_dataset"
    argv = ["data", "convert", "mvd", "--root", str(mvd), "--split", "val", "--version", "v2.0"]
    assert main([*argv, "--out", str(tmp_path / "mvd"), "--quiet"]) == 0
    city = FIXTURES / "cityscapes_dataset" / "dataset"
    argv = ["data", "convert", "cityscapes", "--root", str(city), "--split", "test"]
    assert main([*argv, "--out", str(tmp_path / "city"), "--shard-size", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert shards.load_manifest(tmp_path / "mvd")["source"]["version"] == "v2.0"
    assert len(shards.load_manifest(tmp_path / "city")["shards"]) == 2


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = ["--annotations", str(tmp_path / "nope.json"), "--images", str(tmp_path)]
    assert main(["data", "convert", "coco", *missing, "--out", out]) == 2
    assert "nope.json: annotation file not found" in _one_line_error(capsys)

    assert (
        main(["data", "convert", "mvd", "--root", str(tmp_path), "--split", "x", "--out", out]) == 2
    )
    assert "config_v1.2.json: not found" in _one_line_error(capsys)

    argv = ["data", "convert", "cityscapes", "--root", str(tmp_path), "--split", "x", "--out", out]
    assert main(argv) == 2
    assert "not found; expected the Cityscapes layout" in _one_line_error(capsys)

    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in _one_line_error(capsys)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    assert main(["data", "convert", "coco", *VAL_ARGS, "--out", str(foreign)]) == 2
    assert "not empty" in _one_line_error(capsys)

    assert main(["data", "convert", "coco", *VAL_ARGS, "--out", out, "--quiet"]) == 0
    assert main(["data", "convert", "coco", *VAL_ARGS, "--out", out, "--quiet"]) == 2
    assert "--resume" in _one_line_error(capsys)
    assert main(["data", "convert", "coco", *VAL_ARGS, "--out", out, "--resume", "--quiet"]) == 0

    train = [
        "--annotations",
        str(COCO_DIR / "annotations" / "instances_train.json"),
        "--images",
        str(COCO_DIR / "images" / "train"),
    ]
    argv = ["data", "convert", "coco", *train, "--out", str(tmp_path / "s"), "--strict"]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert "annotation 1 (image 5, a.jpg): empty segmentation" in line

    with pytest.raises(SystemExit) as exc:
        main(["data", "convert", "coco", *VAL_ARGS, "--out", out, "--workers", "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("fmt", ["coco", "mvd"])
def test_synth_then_convert(tmp_path, capsys, fmt):
    src = tmp_path / "src"
    assert (
        main(["data", "synth", "--format", fmt, "--images", "3", "--seed", "0", "--out", str(src)])
        == 0
    )
    out = str(tmp_path / "out")
    if fmt == "coco":
        args = [
            "--annotations",
            str(src / "annotations" / "instances_train.json"),
            "--images",
            str(src / "images" / "train"),
        ]
    else:
        args = ["--root", str(src), "--split", "train"]
    assert main(["data", "convert", fmt, *args, "--out", out, "--workers", "1", "--quiet"]) == 0
    manifest = shards.load_manifest(out)
    assert manifest["totals"]["records"] == 3 and manifest["skipped"] == []
