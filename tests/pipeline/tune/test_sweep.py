"""Sweep files without Ray: the shipped sweeps expand as the paper says, bad input fails early."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution

from pipeline.cli import main
from pipeline.tune.results import Row, best_row, status_of, to_csv, to_markdown, write_results
from pipeline.tune.runner import check_record, concurrency, prepare, sweep_tracking_uri
from pipeline.tune.search import optuna_space, searched_trial
from pipeline.tune.sweep import asha_rungs, base_job, expand, load_sweep

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "jobs" / "configs" / "tiny_synth.yaml"
NORMS = {
    "model.backbone.norm",
    "model.backbone.trainable_layers",
    "model.fpn.norm",
    "model.bpa.norm",
    "model.box_head.norm",
    "model.mask_head.norm",
}


def jobs_of(sweep_name: str, tmp_path: Path, config: Path | None = None) -> dict:
    """{trial name: resolved flat job config} of a shipped sweep on its own base config."""
    sweep = load_sweep(sweep_name)
    job, base = base_job(config or sweep.config, {"checkpoint.storage_path": str(tmp_path)})
    prepared = prepare(sweep, expand(sweep), job, base)
    return {t.name: j.flat() for t, j in zip(prepared.trials, prepared.jobs)}


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k != "name"}


def test_table3_is_the_papers_ladder(tmp_path: Path) -> None:
    jobs = jobs_of("table3", tmp_path)
    assert list(jobs) == [
        "rbl", "mst", "mbn", "bpa", "afp", "bpa-afp", "ff", "hhd", "panet-noMBN"
    ]  # fmt: skip
    rbl = jobs["rbl"]
    assert rbl["model.backbone.norm"] == "frozen_bn" and rbl["model.backbone.trainable_layers"] == 3
    assert not any(rbl[f"model.{k}.enabled"] for k in ("bpa", "afp", "mask_head.ff"))
    assert rbl["model.box_head.type"] == "2fc" and rbl["data.train_scales"] == [800]
    # Each rung adds exactly the paper's step to the previous one.
    assert changed(jobs["rbl"], jobs["mst"]) == {"data.train_scales", "data.max_size"}
    assert changed(jobs["mst"], jobs["mbn"]) == NORMS
    assert jobs["mbn"]["model.backbone.norm"] == "syncbn"
    assert changed(jobs["mbn"], jobs["bpa"]) == {"model.bpa.enabled"}
    assert changed(jobs["mbn"], jobs["afp"]) == {"model.afp.enabled"}  # AFP without BPA
    assert changed(jobs["bpa"], jobs["bpa-afp"]) == {"model.afp.enabled"}
    assert changed(jobs["bpa-afp"], jobs["ff"]) == {"model.mask_head.ff.enabled"}
    assert changed(jobs["ff"], jobs["hhd"]) == {"model.box_head.type"}
    # panet-noMBN: the full model with the RBL norms.
    assert changed(jobs["hhd"], jobs["panet-noMBN"]) == NORMS
    assert all(jobs["panet-noMBN"][k] == rbl[k] for k in NORMS)
    # Tracking and storage are the sweep's, one directory a trial.
    assert {j["checkpoint.storage_path"] for j in jobs.values()} == {
        str(tmp_path / "sweeps" / "table3" / "trials")
    }


def test_table3_carries_the_papers_numbers() -> None:
    paper = {t.name: t.paper for t in expand(load_sweep("table3"))}
    assert paper["rbl"] == {"segm_AP": 33.4, "bbox_AP": 36.4}
    assert paper["hhd"] == {"segm_AP": 37.8, "bbox_AP": 42.1}
    assert paper["ff"] == {"segm_AP": 37.6}
    assert paper["afp"] == {"segm_AP": 36.3, "bbox_AP": 39.6}
    assert paper["panet-noMBN"] == {}


def test_table4_is_position_by_operation(tmp_path: Path) -> None:
    jobs = jobs_of("table4", tmp_path)
    combos = {
        (j["model.afp.position"], j["model.afp.fusion"])
        for n, j in jobs.items()
        if j["model.afp.enabled"]
    }
    assert combos == {(p, f) for p in ("fu.fc1fc2", "fc1fu.fc2") for f in ("max", "sum")}
    assert not jobs["baseline"]["model.afp.enabled"]
    assert all(
        not j["model.bpa.enabled"] and j["model.fpn.norm"] == "syncbn" for j in jobs.values()
    )
    paper = {t.name: t.paper for t in expand(load_sweep("table4"))}
    assert paper["fc1fu.fc2-sum"] == {"segm_AP": 36.2, "bbox_AP": 38.0}
    assert paper["baseline"] == {"segm_AP": 35.7, "bbox_AP": 37.1}


def test_table5_is_start_and_fusion(tmp_path: Path) -> None:
    jobs = jobs_of("table5", tmp_path)
    rows = {
        n: (j["model.mask_head.ff.start"], j["model.mask_head.ff.fusion"])
        for n, j in jobs.items()
        if j["model.mask_head.ff.enabled"]
    }
    assert sorted(rows.values()) == sorted(
        [("conv2", "sum"), ("conv3", "sum"), ("conv4", "sum"), ("conv3", "max")]
        + [("conv3", "product")]
    )
    assert not jobs["baseline"]["model.mask_head.ff.enabled"]
    assert all(j["model.bpa.enabled"] and j["model.afp.enabled"] for j in jobs.values())
    paper = {t.name: t.paper["segm_AP"] for t in expand(load_sweep("table5"))}
    assert paper == {
        "baseline": 36.9, "conv2-sum": 37.5, "conv3-sum": 37.6, "conv4-sum": 37.2,
        "conv3-max": 37.1, "conv3-product": 36.9,
    }  # fmt: skip


def test_hparams_is_an_optuna_search(tmp_path: Path) -> None:
    sweep = load_sweep("hparams")
    assert sweep.algorithm == "optuna" and sweep.scheduler == "asha" and sweep.mode == "max"
    trials = expand(sweep)
    assert [t.name for t in trials] == [f"trial-{i:03d}" for i in range(16)]
    space = optuna_space(sweep)
    assert space["solver.base_lr"] == FloatDistribution(0.005, 0.04, log=True)
    assert space["data.train_scales"].choices[0] == "[800]"  # lists travel as JSON text
    # What the study draws decodes to the job's own values.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [study.ask(space).params for _ in range(8)]
    decoded = [searched_trial(sweep, "trial-000", d).overrides for d in drawn]
    assert all(isinstance(d["data.train_scales"], list) for d in decoded)
    assert all(0.005 <= d["solver.base_lr"] <= 0.04 for d in decoded)
    assert {d["model.roi.batch_size_per_image"] for d in decoded} <= {256, 512}
    with pytest.raises(ValueError, match="not one of its choices"):
        searched_trial(sweep, "trial-000", {**drawn[0], "data.train_scales": "[7]"})
    jobs_of("hparams", tmp_path)  # every choice and both ends of every range are valid jobs


def test_random_search_draws_the_same_space_up_front(tmp_path: Path) -> None:
    sweep = dataclasses.replace(load_sweep("hparams"), algorithm="random")
    trials = expand(sweep)
    assert len(trials) == sweep.samples == 16
    lrs = [t.overrides["solver.base_lr"] for t in trials]
    assert all(0.005 <= lr <= 0.04 for lr in lrs) and len(set(lrs)) == 16
    assert {t.overrides["solver.warmup_steps"] for t in trials} <= {250, 500, 1000}
    assert {t.overrides["model.roi.batch_size_per_image"] for t in trials} == {256, 512}
    assert len({tuple(t.overrides["data.train_scales"]) for t in trials}) > 1
    assert expand(sweep) == trials  # the same seed draws the same trials


def test_seeds_repeat_every_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.yaml"
    variants = [{"name": "a"}, {"name": "b", "set": {"model.bpa.enabled": False}}]
    path.write_text(yaml.safe_dump({"seeds": 3, "variants": variants}))
    trials = expand(load_sweep(str(path)))
    assert [t.name for t in trials] == ["a-s0", "b-s0", "a-s1", "b-s1", "a-s2", "b-s2"]
    assert [(t.group, t.overrides["seed"]) for t in trials[:4]] == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1)
    ]  # fmt: skip
    assert all(t.overrides.get("model.bpa.enabled", True) is (t.group == "a") for t in trials)
    assert main(["tune", "--sweep", str(path), "--config", str(TINY), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "every row runs 3 times: seed=0..2" in out and "b-s2  model.bpa.enabled=false seed=2" in out
    )


def test_grid_search_product_and_samples(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "samples": 2,
                "search": {
                    "model.afp.fusion": {"grid": ["max", "sum"]},
                    "solver.base_lr": {"uniform": [0.001, 0.002]},
                    "seed": {"grid": [0, 1, 2]},
                },
            }
        )
    )
    trials = expand(load_sweep(str(path)))
    assert len(trials) == 2 * 2 * 3
    assert [t.name for t in trials[:3]] == ["000", "001", "002"]
    assert {(t.overrides["model.afp.fusion"], t.overrides["seed"]) for t in trials[:6]} == {
        (f, s) for f in ("max", "sum") for s in (0, 1, 2)
    }
    assert all(0.001 <= t.overrides["solver.base_lr"] <= 0.002 for t in trials)


def test_dry_run_prints_trials(capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--sweep", "table4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep 'table4': 5 trial(s)" in out
    assert "fu.fc1fc2-sum  model.afp.position=fu.fc1fc2 model.afp.fusion=sum" in out


def test_dry_run_on_a_cpu_config_says_the_sweep_trains_at_paper_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # names, not checkout paths
    assert main(["tune", "--sweep", "table3", "--config", "tiny_synth", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # Each paper row with its numbers; booleans as YAML writes them.
    assert "rbl          (base config)  [paper: segm AP 33.4, bbox AP 36.4]" in out
    assert "  ff  " in out and "[paper: segm AP 37.6]" in out
    assert "model.bpa.enabled=false" in out and "model.mask_head.ff.enabled=true" in out
    assert "True" not in out and "False" not in out
    # The sizes the trials train at, against the CPU config's.
    assert (
        "data.train_scales: [192,256] in the base config -> [800] or [1200,1000,800,600,400]" in out
    )
    assert "data.max_size: 400 in the base config -> 1333 or 1400" in out
    assert "data.scale_range: true in the base config -> false" in out
    # A sweep that keeps the base config's sizes says nothing about them.
    assert main(["tune", "--sweep", "demo", "--config", "tiny_synth", "--dry-run"]) == 0
    assert "image sizes" not in capsys.readouterr().out


def test_tune_help_lists_every_shipped_sweep(capsys: pytest.CaptureFixture) -> None:
    from pipeline.config import shipped_names

    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert "demo" in shipped_names("sweeps")
    for name in shipped_names("sweeps"):
        assert name in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"variants": [{"name": "a", "set": {"model.afp.fusoin": "max"}}]}, "model.afp.fusoin"),
        ({"variants": [{"name": "a", "set": {"model.afp.fusion": "avg"}}]}, "model.afp.fusion"),
        ({"search": {"solver.base_lr": {"loguniform": [0, 1]}}}, "solver.base_lr"),
        ({"search": {"solver.base_lr": {"normal": [0, 1]}}}, "solver.base_lr"),
        ({"metric": "mAP"}, "metric"),
        ({"scheduler": "pbt"}, "scheduler"),
        ({"samplez": 2}, "samplez"),
        ({"seeds": 0}, "seeds"),
        ({"seeds": 2, "variants": [{"name": "a", "set": {"seed": 1}}]}, "remove the key 'seed'"),
        ({"search": {"algorithm": "tpe"}}, "search.algorithm"),
        ({"search": {"algorithm": "optuna"}}, "no searched key"),
        (
            {"search": {"algorithm": "optuna", "model.afp.fusion": {"grid": ["max", "sum"]}}},
            "'model.afp.fusion': grid",
        ),
        (
            {
                "variants": [{"name": "a"}],
                "search": {"algorithm": "optuna", "seed": {"choice": [0, 1]}},
            },
            "variants",
        ),
        (
            {"search": {"algorithm": "optuna", "model.afp.fusion": {"choice": ["max", "avg"]}}},
            "search 'model.afp.fusion' value 'avg'",
        ),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "twice"),
        ({"set": {"model.preset": "rbl"}}, "model.preset"),
        ({"scheduler": "asha", "set": {"eval.every_steps": 0}}, "eval.every_steps"),
        (
            {"scheduler": "asha", "set": {"eval.every_steps": 10, "checkpoint.every_steps": 4}},
            "checkpoint.every_steps",
        ),
    ],
)
def test_bad_sweeps_fail_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: dict, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    code = main(["tune", "--sweep", str(path), "--config", str(TINY), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("panet tune: error:")


def test_unknown_sweep_names_the_shipped_ones(capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--sweep", "table9", "--dry-run"]) == 2
    assert "table3" in capsys.readouterr().err


def test_asha_rungs_fall_on_evaluations() -> None:
    sweep = load_sweep("hparams")
    assert asha_rungs(sweep, eval_every=20000, max_steps=160000) == [20000, 40000, 80000]


def prepared(tmp_path: Path, **sets):
    sweep = load_sweep("table4")
    job, base = base_job(TINY, {"checkpoint.storage_path": str(tmp_path), **sets})
    return prepare(sweep, expand(sweep), job, base)


def test_concurrency_from_the_cluster(tmp_path: Path) -> None:
    p = prepared(tmp_path)  # 2 workers x 1 CPU + 0.5 for Ray Data + the trial actor
    assert concurrency(p, {"CPU": 4.0}) == 1
    assert concurrency(p, {"CPU": 8.0}) == 3
    assert concurrency(p, {"CPU": 64.0}) == 5  # no more than the trials
    with pytest.raises(ValueError, match="scaling.num_workers"):
        concurrency(p, {"CPU": 2.0})


def test_concurrency_on_an_autoscaling_cluster_counts_what_it_grows_to(tmp_path: Path) -> None:
    # KubeRay's and the launcher's worker groups start at zero: the head alone has 0 CPU, 0 GPU.
    p = prepared(tmp_path, **{"scaling.use_gpu": True})  # 2 GPUs a trial
    now = {"CPU": 0.0}
    with pytest.raises(ValueError, match="the cluster has 0"):
        concurrency(p, now, {})
    assert concurrency(p, now, {"CPU": 224.0, "GPU": 16.0}) == 5  # the 5 trials, 8 would fit
    assert concurrency(p, now, {"CPU": 224.0, "GPU": 4.0}) == 2
    with pytest.raises(ValueError, match="GPU.*grows to at most 1"):
        concurrency(p, now, {"CPU": 224.0, "GPU": 1.0})


def test_shared_tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    p = prepared(tmp_path)
    assert p.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'sweeps' / 'mlflow.db'}"
    assert {j.tracking.uri for j in p.jobs} == {p.tracking_uri}  # not one file per trial
    job, _ = base_job(TINY, {"ray.address": "10.0.0.5:6379"})
    with pytest.raises(ValueError, match="tracking.uri"):
        sweep_tracking_uri(job, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert sweep_tracking_uri(job, tmp_path) == "http://mlflow:5000"


def test_a_sweep_name_keeps_its_trials(tmp_path: Path) -> None:
    assert check_record(prepared(tmp_path)) is False  # new
    assert check_record(prepared(tmp_path)) is True  # the same: a restore
    with pytest.raises(ValueError, match="already exists"):
        check_record(prepared(tmp_path, seed=3))


def rows() -> list[Row]:
    return [
        Row("rbl", {"a": 1}, 6, 0.20, 0.18, "finished", {"segm_AP": 33.4}, 0.18),
        Row("poor", {"a": 2}, 2, 0.01, 0.005, "early-stopped", {}, 0.005),
        Row("bad", {"a": 3}, 0, math.nan, math.nan, "failed", {}, math.nan),
    ]


def test_results_table_csv_and_chart(tmp_path: Path) -> None:
    md = to_markdown(rows(), {"a": 0})
    assert "| rbl | a=1 | 6 | 20.0 | 18.0 |  | 33.4 | finished |" in md
    assert "| poor | a=2 | 2 | 1.0 | 0.5 |  |  | early-stopped |" in md
    table = list(csv.DictReader(io.StringIO(to_csv(rows()))))
    assert [r["status"] for r in table] == ["finished", "early-stopped", "failed"]
    assert float(table[0]["segm_AP"]) == pytest.approx(0.18) and table[2]["segm_AP"] == ""
    paths = write_results(rows(), tmp_path, "t", {})
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert best_row(rows(), "max").trial == "rbl"
    assert best_row(rows(), "min").trial == "poor"


def test_status_of() -> None:
    assert status_of(True, True, 6, 6) == "failed"
    assert status_of(False, False, 4, 6) == "unfinished"
    assert status_of(False, True, 6, 6) == "finished"
    assert status_of(False, True, 4, 6) == "early-stopped"


def test_demo_sweep_is_three_tiny_rows_over_two_seeds(tmp_path: Path) -> None:
    jobs = jobs_of("demo", tmp_path)
    rows = ["tiny", "tiny-noBPA", "tiny-noAFP"]
    assert list(jobs) == [f"{r}-s{k}" for k in (0, 1) for r in rows]
    assert {j["model_preset"] for j in jobs.values()} == {"tiny"}
    assert {j["scaling.num_workers"] for j in jobs.values()} == {2}
    assert changed(jobs["tiny-s0"], jobs["tiny-noBPA-s0"]) == {"model.bpa.enabled"}
    assert changed(jobs["tiny-s0"], jobs["tiny-noAFP-s0"]) == {"model.afp.enabled"}
    assert changed(jobs["tiny-s0"], jobs["tiny-s1"]) == {"seed"}
