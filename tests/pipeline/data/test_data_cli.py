"""`panet data ...` through `pipeline.cli.main`: help, convert, inspect/verify, errors, synth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.manifest import load_manifest

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
    assert load_manifest(tmp_path / "mvd")["source"]["version"] == "v2.0"
    assert len(load_manifest(tmp_path / "city")["shards"]) == 2


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
    manifest = load_manifest(out)
    assert manifest["totals"]["records"] == 3 and manifest["skipped"] == []


def _synth(fmt: str, out: Path, *extra: str) -> int:
    return main(["data", "synth", "--format", fmt, "--images", "4", "--out", str(out), *extra])


def test_synth_split_makes_a_validation_set(tmp_path, capsys):
    root = tmp_path / "coco"
    assert _synth("coco", root) == 0 and _synth("coco", root, "--split", "val", "--seed", "1") == 0
    names = sorted(p.name for p in (root / "annotations").iterdir())
    assert names == ["instances_train.json", "instances_val.json"]
    assert len(list((root / "images" / "val").iterdir())) == 4
    mvd = tmp_path / "mvd"
    assert _synth("mvd", mvd, "--split", "training") == 0
    out = str(tmp_path / "shards")
    args = ["data", "convert", "mvd", "--root", str(mvd), "--out", out, "--workers", "1"]
    assert main([*args, "--split", "training", "--quiet"]) == 0
    # A split that is not there: the converter names the ones that are.
    assert main([*args, "--split", "validation", "--quiet"]) == 2
    assert f"split 'validation' not found; the splits under {mvd} are training" in (
        capsys.readouterr().err
    )


def test_synth_refuses_to_mix_layouts(tmp_path, capsys):
    root = tmp_path / "data"
    assert _synth("coco", root) == 0
    assert _synth("mvd", root) == 2
    err = capsys.readouterr().err
    assert "already holds a COCO data set" in err and not any(root.glob("config*.json"))
    assert _synth("mvd", tmp_path / "mvd") == 0
    assert _synth("coco", tmp_path / "mvd") == 2
    assert "already holds a MVD data set" in capsys.readouterr().err
    assert not (tmp_path / "mvd" / "annotations").exists()


def test_a_conversion_that_keeps_nothing_fails_with_a_hint(tmp_path, capsys):
    root = tmp_path / "coco"
    assert _synth("coco", root) == 0
    ann = str(root / "annotations" / "instances_train.json")
    out = tmp_path / "out"
    args = ["data", "convert", "coco", "--annotations", ann, "--workers", "1", "--quiet"]
    assert main([*args, "--images", str(root / "images"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "kept 0 of 4 images" in err and "missing_image" in err and "is --images" in err
    assert main(["data", "inspect", str(out), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "verify: FAILED" in captured.out and "shard set is empty" in captured.err
    # Most images missing: an error; one of four: a warning in the summary, exit 0.
    images = sorted((root / "images" / "train").iterdir())
    for image in images[:3]:
        image.rename(tmp_path / image.name)
    good = [*args, "--images", str(root / "images" / "train")]
    assert main([*good, "--out", str(tmp_path / "most")]) == 2
    assert "kept 1 of 4 images (3 skipped" in capsys.readouterr().err
    for image in images[1:3]:
        (tmp_path / image.name).rename(image)
    assert main([*good, "--out", str(tmp_path / "some")]) == 0
