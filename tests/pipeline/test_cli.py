"""The `panet` command line: help for every sub-command, config errors without tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def test_train_dry_run_checks_the_data(
    shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = train_args(shards, tmp_path)
    assert main(args) == 0
    assert "4 training images, 2 steps/epoch" in capsys.readouterr().out
    # More images per step than the data set holds: named before any worker starts.
    assert main([*args, "--set", "solver.ims_per_batch=16"]) == 2
    assert "solver.ims_per_batch" in capsys.readouterr().err
    # A directory that is not a shard directory.
    assert main([*args, "--set", f"data.val={shards['val'].parent.parent / 'raw'}"]) == 2
    assert "data.val" in capsys.readouterr().err


def test_eval_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path)])
    assert code == 2 and "nope" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Frictions a new user meets: help, versions, job directories, changed configs, resources.


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 training and 4 validation images as shards."""
    from pipeline.demo import ensure_shards

    root = tmp_path_factory.mktemp("data")
    return {s: ensure_shards(root / "raw", root / "shards", s, 4, i) for i, s in
            enumerate(("train", "val"))}  # fmt: skip


def train_args(shards: dict[str, Path], storage: Path, *sets: str) -> list[str]:
    args = ["train", "--config", str(REPO / "jobs/configs/tiny_synth.yaml"), "--dry-run"]
    for item in (
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        f"checkpoint.storage_path={storage}",
        "solver.ims_per_batch=2",
        *sets,
    ):
        args += ["--set", item]
    return args


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"panet {version('panet-on-ray')}"


def test_train_without_config_says_to_pass_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and len(err.strip().splitlines()) == 1


def test_eval_options_are_checked_and_help_shows_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for option in ("--workers", "--batch-size"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--checkpoint", "c", "--data", "d", option, "0"])
        assert exit_info.value.code == 2
        assert f"argument {option}: expected a positive integer" in capsys.readouterr().err
    for command in (["eval"], ["train"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert ("(default: 2)" in out) == (command == ["eval"])
        assert "(default: None)" not in out and "(default: False)" not in out


def _fake_job_dir(job_dir: Path, aps: dict[int, float]) -> None:
    import json

    from pipeline.state_file import STATE_FILE, seal

    for step, ap in aps.items():
        d = job_dir / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / STATE_FILE).write_bytes(b"")
        (d / "metrics.json").write_text(json.dumps({"step": step, "segm/AP": ap}))
        seal(d)


def test_eval_takes_a_job_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.evaluate import job

    job_dir = tmp_path / "job"
    _fake_job_dir(job_dir, {150: 0.30, 300: 0.25, 450: 0.20})
    taken: list[str] = []
    monkeypatch.setattr(job, "run_eval_job", lambda ckpt, *_, **__: taken.append(ckpt) or {})
    assert main(["eval", "--checkpoint", str(job_dir), "--data", str(tmp_path)]) == 0
    assert main(["eval", "--checkpoint", str(job_dir), "--best", "--data", str(tmp_path)]) == 0
    assert taken == [str(job_dir / "step-00000450"), str(job_dir / "step-00000150")]
    out = capsys.readouterr().out
    assert f"step-00000450 (latest of 3 in {job_dir})" in out
    assert "step-00000150 (best by segm AP (0.300) of 3" in out
    # A step directory is taken as it is; an empty directory is named.
    assert main(["eval", "--checkpoint", str(job_dir / "step-00000300"), "--data", "x"]) == 0
    assert taken[-1] == str(job_dir / "step-00000300")
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "empty"), "--data", "x"]) == 2
    assert "neither a checkpoint nor a job directory" in capsys.readouterr().err


def test_dry_run_checks_resources_without_ray(
    shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    import ray

    assert main(train_args(shards, tmp_path)) == 0
    capsys.readouterr()
    cores = os.cpu_count() or 1
    assert main(train_args(shards, tmp_path, f"scaling.cpus_per_worker={cores}")) == 2
    err = capsys.readouterr().err
    assert "scaling.num_workers" in err and f"this machine has {cores:g}" in err
    assert main(train_args(shards, tmp_path, "ray.num_cpus=2")) == 2  # 2 workers + Ray Data
    assert "ray.num_cpus is 2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(train_args(shards, tmp_path, "scaling.use_gpu=true")) == 2
        assert "'scaling.use_gpu': 2 workers need one GPU each" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_dry_run_checks_weights(
    shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "resnet50.pth"
    assert main(train_args(shards, tmp_path, f"model.backbone.weights={missing}")) == 2
    err = capsys.readouterr().err
    assert "'model.backbone.weights'" in err and str(missing) in err
    assert main(train_args(shards, tmp_path, f"model.weights={missing}")) == 2
    assert "'model.weights'" in capsys.readouterr().err
    torch.save({"conv1.weight": torch.zeros(3, 3, 1, 1)}, missing)  # not this model's tensors
    assert main(train_args(shards, tmp_path, f"model.weights={missing}")) == 2
    assert "do not fit the model" in capsys.readouterr().err


@pytest.fixture
def trained_job(shards: dict[str, Path], tmp_path: Path) -> Path:
    """A job directory with one checkpoint of the tiny model, as `panet train` leaves it."""
    from panet_model import build_panet
    from pipeline.config import load_job_config, parse_set
    from pipeline.state_file import save_state
    from pipeline.train.preflight import preflight
    from pipeline.train.resume import write_job_record

    args = train_args(shards, tmp_path)
    job = load_job_config(args[2], parse_set(args[5::2]))
    plan = preflight(job)
    step = job.run_dir / "step-00000002"
    step.mkdir(parents=True)
    model = build_panet(job.model, num_classes=plan.num_classes)
    save_state(step, model=model.state_dict(), config=job.to_dict(), step=2,
               categories=plan.categories)  # fmt: skip
    write_job_record(job.run_dir, plan.manifest_id, plan.val_manifest_id)
    return job.run_dir


def test_a_changed_config_is_refused_unless_asked(
    shards: dict[str, Path], trained_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train_args(shards, tmp_path)) == 0  # the same config resumes
    # Keys that only change how the job runs: it resumes, naming them.
    assert main(train_args(shards, tmp_path, "solver.max_steps=900", "log_every=5")) == 0
    assert "resumes with changes: log_every 10 -> 5, solver.max_steps 300 -> 900" in (
        capsys.readouterr().out
    )
    changed = train_args(shards, tmp_path, "model.afp.fusion=sum", "solver.base_lr=0.001")
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(trained_job) in err
    assert "model.afp.fusion max -> sum, solver.base_lr 0.003 -> 0.001" in err
    assert "--resume" in err and "--new-name" in err
    assert main([*changed, "--resume"]) == 0
    assert "model.afp.fusion max -> sum" in capsys.readouterr().out
    assert main([*changed, "--new-name"]) == 0
    assert "training a new job: 'tiny-synth-2'" in capsys.readouterr().out
    assert main([*changed, "--set", "name=other"]) == 0
    with pytest.raises(SystemExit):
        main([*changed, "--resume", "--new-name"])


def test_a_job_never_resumes_on_other_data(
    shards: dict[str, Path], trained_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from pipeline.train.resume import JOB_RECORD

    record = json.loads((trained_job / JOB_RECORD).read_text())
    (trained_job / JOB_RECORD).write_text(json.dumps({**record, "train_fingerprint": "f" * 64}))
    for extra in ([], ["--resume"]):
        assert main([*train_args(shards, tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "other shards (manifest fingerprint ffffffffffff" in err and "--new-name" in err
    (trained_job / JOB_RECORD).write_text(json.dumps(record))
    # Other class names: the validation shards' categories stand in for another data set.
    from pipeline.state_file import load_state, save_state

    step = trained_job / "step-00000002"
    state = load_state(step)
    save_state(step, **{**state, "categories": {1: "cat", 2: "dog"}})
    assert main([*train_args(shards, tmp_path), "--resume"]) == 2
    assert "other categories (1:cat, 2:dog)" in capsys.readouterr().err
