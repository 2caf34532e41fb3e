"""Job config: YAML + --set, validated before anything touches Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import JobConfig, load_job_config, parse_set

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "tiny_synth.yaml"
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    job = load_job_config(path)
    assert job.name and job.model_preset in ("tiny", "rbl", "panet")
    # A config written back loads to the same thing.
    again = load_job_config(None, {**_flat_sets(job.to_dict())})
    assert again == job


def _flat_sets(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_sets(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_set_overrides_model_and_job_keys() -> None:
    job = load_job_config(
        REPO / "jobs/configs/tiny_synth.yaml",
        parse_set(["model.afp.fusion=sum", "solver.max_steps=7", "data.train_scales=[200, 300]"]),
    )
    assert job.model.afp.fusion == "sum"
    assert job.solver.max_steps == 7
    assert job.data.train_scales == (200, 300)
    assert job.local_batch_size == job.solver.ims_per_batch // job.scaling.num_workers


def test_preset_switch_keeps_other_model_keys() -> None:
    job = load_job_config(
        None, {"model.preset": "rbl", "model.afp.enabled": True, "data.train": "a", "data.val": "b"}
    )
    assert job.model_preset == "rbl" and job.model.afp.enabled and not job.model.bpa.enabled


def test_lr_scales_with_the_global_batch() -> None:
    job = load_job_config(
        None,
        {"data.train": "a", "data.val": "b", "solver.ims_per_batch": 8, "scaling.num_workers": 4},
    )
    assert job.lr == pytest.approx(0.02 * 8 / 16)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["solver.max_stepz=3"], "solver.max_stepz"),
        (["solver.max_steps=three"], "solver.max_steps"),
        (["model.afp.fusion=min"], "model.afp.fusion"),
        (["model.preset=huge"], "huge"),
        (["scaling.num_workers=3"], "solver.ims_per_batch"),
        (["scaling.num_workers=0"], "scaling.num_workers"),
        (["solver.decay_steps=[5, 2]"], "solver.decay_steps"),
        (["data.val="], "data.val"),
        (["name=a/b"], "name"),
        (["data.decode_concurrency=-1"], "data.decode_concurrency"),
        (["data.decode_cpus=0"], "data.decode_cpus"),
    ],
)
def test_bad_config_names_the_key(sets: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_job_config(REPO / "jobs/configs/tiny_synth.yaml", parse_set(sets))


@pytest.mark.parametrize(
    ("key", "closest"),
    [
        ("solver.max_step", "solver.max_steps"),  # a typo in the last part
        ("solvr.max_steps", "solver.max_steps"),  # in the section
        ("max_steps", "solver.max_steps"),  # the section left out
        ("model.afpp.fusion", "model.afp.fusion"),  # in a nested section
        ("model.mask_head.ff.enabeld", "model.mask_head.ff.enabled"),
    ],
)
def test_an_unknown_key_names_the_closest_one(key: str, closest: str) -> None:
    with pytest.raises(ValueError, match=r"\(fields: .*\)") as err:
        load_job_config("tiny_synth", {key: 1})
    assert str(err.value).endswith(f"; did you mean {closest}?")


def test_an_unknown_key_like_no_other_suggests_nothing() -> None:
    with pytest.raises(ValueError, match="zzz") as err:
        load_job_config("tiny_synth", {"zzz.qqq": 1})
    assert "did you mean" not in str(err.value)


def test_evaluations_fall_on_checkpoints_with_several_workers() -> None:
    """Ranks 1.. wait for rank 0's COCOeval at the checkpoint's report, never in an all-reduce.

    tiny_synth: 2 workers, 300 steps.
    """
    with pytest.raises(
        ValueError, match=r"'eval\.every_steps'.* checkpoint\.every_steps \(40\) .*got 100"
    ):
        load_job_config(CONFIG, {"eval.every_steps": 100, "checkpoint.every_steps": 40})
    fine = [
        {"eval.every_steps": 120, "checkpoint.every_steps": 40},
        {"eval.every_steps": 0, "checkpoint.every_steps": 40},  # only at the end
        {"eval.every_steps": 300, "checkpoint.every_steps": 40},  # the last step has both
        {"eval.every_steps": 100, "checkpoint.every_steps": 40, "scaling.num_workers": 1},
    ]
    for sets in fine:
        assert load_job_config(CONFIG, sets).eval.every_steps == sets["eval.every_steps"]


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_job_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml.*not valid YAML"):
        load_job_config(bad)
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        parse_set(["novalue"])


def test_shipped_configs_and_sweeps_by_name_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    from pipeline.config import resolve_config, resolve_shipped, shipped_names

    monkeypatch.chdir(tmp_path)  # not the checkout: names resolve through the installed package
    assert shipped_names("configs") == [p.stem for p in CONFIGS]
    assert resolve_config("tiny_synth").samefile(CONFIG)
    assert resolve_config("tiny_synth.yaml").samefile(CONFIG)
    assert load_job_config("tiny_synth") == load_job_config(CONFIG)
    assert resolve_shipped("table3", "sweeps").samefile(REPO / "jobs/sweeps/table3.yaml")
    # A file of that name in the working directory wins over the shipped one.
    (tmp_path / "tiny_synth").write_text("name: mine\ndata: {train: a, val: b}\n")
    assert load_job_config("tiny_synth").name == "mine"
    # Neither a file nor a shipped name: the error lists what is shipped.
    with pytest.raises(
        ValueError,
        match=r"config file 'jobs/configs/tiny_synth.yaml' does not exist.*shipped configs, by name: cityscapes_panet_r50, .*tiny_synth",
    ):
        load_job_config("jobs/configs/tiny_synth.yaml")  # a checkout's path, here relative to tmp
    with pytest.raises(ValueError, match=r"; did you mean table3\?$"):  # its shipped name
        resolve_shipped("jobs/sweeps/table3.yaml", "sweeps")
    with pytest.raises(
        ValueError, match=r"sweep file 'table9' does not exist.*demo, hparams, table3"
    ) as err:
        resolve_shipped("table9", "sweeps")
    assert "did you mean" not in str(err.value)


def test_flat_has_model_keys() -> None:
    flat = JobConfig().flat()
    assert flat["model.afp.fusion"] == "max" and flat["solver.base_lr"] == 0.02


def test_resuming_a_job_of_another_model_fails_before_ray(tmp_path: Path) -> None:
    """A job directory whose checkpoint no longer fits the model is named, with what changed."""
    from panet_model import build_panet
    from pipeline.demo import ensure_shards
    from pipeline.state_file import save_state
    from pipeline.train.preflight import preflight

    shards = {
        s: ensure_shards(tmp_path / "raw", tmp_path / "shards", s, 4, i)
        for i, s in enumerate(("train", "val"))
    }
    sets = {
        "data.train": str(shards["train"]),
        "data.val": str(shards["val"]),
        "checkpoint.storage_path": str(tmp_path / "runs"),
    }
    job = load_job_config(CONFIG, sets)
    plan = preflight(job)  # no checkpoint yet
    wide = load_job_config(CONFIG, {**sets, "model.backbone.width": 64})
    step = job.run_dir / "step-00000002"
    step.mkdir(parents=True)
    model = build_panet(wide.model, num_classes=plan.num_classes)
    save_state(step, model=model.state_dict(), config=wide.to_dict(), step=2)
    with pytest.raises(
        ValueError, match=r"step-00000002.*model\.backbone\.width 64 -> 32.*--resume"
    ):
        preflight(job)
    # Asked to resume with the change: the checkpoint's tensors do not fit the model.
    with pytest.raises(ValueError, match=r"step-00000002 .*model\.backbone\.width 64 -> 32.*name"):
        preflight(job, allow_changes=True)
    preflight(wide)  # the same model resumes


def test_a_finished_job_is_answered_from_its_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipeline import tracking
    from pipeline.state_file import seal
    from pipeline.train.driver import finished_result

    def job_with(**sets):
        return load_job_config(CONFIG, {"checkpoint.storage_path": str(tmp_path), **sets})

    job = job_with(**{"solver.max_steps": 8})
    assert finished_result(job) is None  # a new job
    step_dir = job.run_dir / "step-00000008"
    step_dir.mkdir(parents=True)
    (step_dir / "state.pt").write_bytes(b"only its name is read here")
    (step_dir / "metrics.json").write_text(json.dumps({"step": 8, "segm/AP": 0.5, "bbox/AP": 0.4}))
    seal(step_dir)
    assert finished_result(job) is None  # no MLflow run record yet
    uri = tracking.resolve_tracking_uri(job.run_dir, None)
    (job.run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": "r1", "tracking_uri": uri}))

    assert finished_result(job) == {
        "metrics": {"segm/AP": 0.5, "bbox/AP": 0.4},
        "tracking_uri": uri,
        "run_id": "r1",
        "checkpoint": str(step_dir),
    }
    # Longer now, or logging elsewhere, or an unreadable record: Ray's path takes over.
    assert finished_result(job_with(**{"solver.max_steps": 9})) is None
    elsewhere = {"solver.max_steps": 8, "tracking.uri": "http://127.0.0.1:5999"}
    assert finished_result(job_with(**elsewhere)) is None
    (step_dir / "metrics.json").write_text("{not json")
    assert finished_result(job) is None


def test_decode_options_come_from_the_resolved_config() -> None:
    from pipeline.config import decode_options

    job = load_job_config(
        REPO / "jobs/configs/tiny_synth.yaml", {"data.train": "a", "data.val": "b"}
    )
    assert decode_options(job.to_dict()) == {"num_cpus": 0.5, "concurrency": 2}
    uncapped = load_job_config(
        REPO / "jobs/configs/tiny_synth.yaml", {"data.decode_concurrency": 0}
    )
    assert decode_options(uncapped.to_dict())["concurrency"] is None  # Ray Data decides
    # A checkpoint written before these keys existed: Ray Data's defaults.
    assert decode_options({"data": {}}) == {"num_cpus": None, "concurrency": None}


def test_worker_env_sizes_the_onednn_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.ray_session import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_ENV, worker_env

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    env = worker_env()["env_vars"]
    assert env[ONEDNN_CACHE_ENV] == str(ONEDNN_CACHE_CAPACITY) and ONEDNN_CACHE_CAPACITY > 1024
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "1024")  # the driver's value wins
    assert worker_env()["env_vars"][ONEDNN_CACHE_ENV] == "1024"
