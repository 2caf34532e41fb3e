"""What counts as a changed config when a job name is re-run (`pipeline.train.resume`)."""

from __future__ import annotations

from pipeline.config import JobConfig
from pipeline.train.resume import FREE_KEYS, _is_free, config_changes, schema_defaults


def test_keys_a_checkpoint_predates_count_only_when_set() -> None:
    defaults = schema_defaults("tiny")
    new = JobConfig().to_dict()
    old = JobConfig().to_dict()
    del old["model"]["test"]  # written before the key existed
    old["model"]["retired_option"] = 1  # a key the schema no longer has
    assert config_changes(old, new, defaults) == []
    new["model"]["test"]["flip"] = True
    assert config_changes(old, new, defaults) == [("model.test.flip", "unset", True)]


def test_lists_and_tuples_compare_equal_and_changes_are_sorted() -> None:
    old = {"data": {"train_scales": [800, 600]}, "solver": {"base_lr": 0.02}, "seed": 0}
    new = {"data": {"train_scales": (800, 600)}, "solver": {"base_lr": 0.01}, "seed": 1}
    assert config_changes(old, new) == [("seed", 0, 1), ("solver.base_lr", 0.02, 0.01)]


def test_free_keys_are_how_a_job_runs_not_what_it_learns() -> None:
    assert all(_is_free(k) for k in ("solver.max_steps", "eval.batch_size", "ray.max_failures",
                                     "scaling.num_workers", "data.train", "checkpoint.keep_best"))  # fmt: skip
    assert not any(_is_free(k) for k in ("solver.base_lr", "model.afp.fusion", "seed",
                                         "data.train_scales", "data.flip_prob"))  # fmt: skip
    assert "data." not in FREE_KEYS  # augmentation keys change what is learned
