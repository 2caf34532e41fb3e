"""Hostile YAML: alias bombs and huge files are refused at once, naming the file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline import safe_yaml
from pipeline.config import load_job_config, parse_set
from pipeline.tune.sweep import load_sweep

# Ten levels, each nine aliases of the one before: 4.4 billion values once expanded, 1 KB on disk.
LAUGHS = "lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]\n" for i in range(1, 10)
)


def _refused_quickly(call, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        call()
    assert time.perf_counter() - start < 0.5


def test_an_alias_bomb_is_refused_in_configs_sweeps_and_sets(tmp_path: Path) -> None:
    config, sweep = tmp_path / "job.yaml", tmp_path / "sweep.yaml"
    config.write_text(f"name: bomb\n{LAUGHS}")
    sweep.write_text(f"metric: segm_ap\n{LAUGHS}")
    expanded = r"holds 4,412,961,51\d values with its aliases expanded, over the limit of 100,000"
    _refused_quickly(lambda: load_job_config(config), f"config file '{config}' {expanded}")
    _refused_quickly(lambda: load_sweep(str(sweep)), f"sweep file '{sweep}' {expanded}")
    laughs = "{" + LAUGHS.strip().replace("\n", ", ") + "}"
    _refused_quickly(lambda: parse_set([f"name={laughs}"]), f"--set name {expanded}")
    _refused_quickly(lambda: parse_set(["name=&a [*a]"]), "--set name: an alias refers to")


def test_a_huge_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    with open(config, "wb") as f:  # `name: '` and 100 MB more (sparse: nothing is written)
        f.write(b"name: '")
        f.truncate(100 * 2**20)
    message = f"config file '{config}' is 104,857,600 bytes, over the limit of 1,048,576"
    _refused_quickly(lambda: load_job_config(config), message)
    _refused_quickly(
        lambda: parse_set(["name=" + "x" * (2**20 + 1)]), "--set name is 1,048,577 characters"
    )


def test_anchors_and_merge_keys_within_the_limits_work(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        "solver: &solver {max_steps: 7, base_lr: 0.01}\n"
        "name: anchors\n"
        "eval: {every_steps: 0, batch_size: &two 2}\n"
        "scaling: {num_workers: *two, cpus_per_worker: 1}\n"
        "data: {train: /no/shards, val: /no/shards, train_scales: [128, 160]}\n"
    )
    job = load_job_config(config)
    assert (job.solver.max_steps, job.eval.batch_size, job.scaling.num_workers) == (7, 2, 2)
    merged = safe_yaml.load_text("a: &a {x: 1}\nb: {<<: *a, y: 2}\n", "test")
    assert merged == {"a": {"x": 1}, "b": {"x": 1, "y": 2}}
    with pytest.raises(ValueError, match="'x.yaml' is not valid YAML"):
        safe_yaml.load_text("a: [1,", "'x.yaml'")
