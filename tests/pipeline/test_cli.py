"""The `panet` command line: help for every sub-command, config errors without tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [["train"], ["eval"], ["data"], ["data", "convert", "coco"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: panet" in capsys.readouterr().out


def test_train_bad_key_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["train", "--config", str(REPO / "jobs/configs/tiny_synth.yaml"), "--set", "solver.nope=1"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "solver.nope" in err and "Traceback" not in err


def test_train_dry_run_checks_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.data.convert_coco import convert_coco
    from pipeline.data.synth import write_synthetic

    write_synthetic("coco", 8, 0, tmp_path / "raw", split="train")
    shards = tmp_path / "shards"
    convert_coco(
        tmp_path / "raw/annotations/instances_train.json",
        tmp_path / "raw/images/train",
        shards,
        workers=1,
        progress=False,
    )
    args = ["train", "--config", str(REPO / "jobs/configs/tiny_synth.yaml"), "--dry-run",
            "--set", f"data.train={shards}", "--set", f"data.val={shards}"]  # fmt: skip
    assert main(args) == 0
    assert "8 training images, 2 steps/epoch" in capsys.readouterr().out
    # More images per step than the data set holds: named before any worker starts.
    assert main([*args, "--set", "solver.ims_per_batch=16"]) == 2
    assert "solver.ims_per_batch" in capsys.readouterr().err
    # A directory that is not a shard directory.
    assert main([*args[:-1], f"data.val={tmp_path / 'raw'}"]) == 2
    assert "data.val" in capsys.readouterr().err


def test_eval_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path)])
    assert code == 2 and "nope" in capsys.readouterr().err
