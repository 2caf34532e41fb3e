"""The champion alias on a real MLflow registry (SQLite): registered when a model beats the
current champion's recorded metric, kept otherwise. Read back with a plain `MlflowClient`."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline import tracking
from pipeline.tracking.champion import METRIC_TAG, MODE_TAG, VALUE_TAG


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One SQLite store with three runs that logged a model each and one that logged none."""
    uri = tracking.resolve_tracking_uri(tmp_path_factory.mktemp("champion") / "run", None)
    runs = {}
    for i, name in enumerate(("a", "b", "c", "none")):
        runs[name] = tracking.start_or_resume_run(uri, "champion", name, None)
        if name != "none":
            torch.manual_seed(i)
            model = nn.Linear(3, 2)
            tracking.log_model(uri, runs[name], model, pip_requirements=["torch"])
    return {"uri": uri, "runs": runs}


def registry(uri: str, name: str) -> tuple[list[str], str, dict[str, str]]:
    """The versions of `name`, its champion's version and that version's tags."""
    client = MlflowClient(uri, registry_uri=uri)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    champion = client.get_model_version_by_alias(name, tracking.CHAMPION)
    return versions, str(champion.version), champion.tags


def test_the_champion_moves_only_when_beaten(store: dict) -> None:
    uri, runs = store["uri"], store["runs"]

    def promote(run: str, value: float, metric: str = "segm_AP") -> tracking.Promotion:
        return tracking.promote_champion(uri, "sweep-max", runs[run], metric, "max", value)

    first = promote("a", 0.30)
    assert (first.outcome, first.version) == ("registered", "1")
    assert first.message == "registered v1 as sweep-max@champion (segm_AP 0.3000)"
    versions, champion, tags = registry(uri, "sweep-max")
    assert (versions, champion) == (["1"], "1")
    assert tags == {METRIC_TAG: "segm_AP", VALUE_TAG: "0.3", MODE_TAG: "max"}
    model_id = MlflowClient(uri).get_run(runs["a"]).outputs.model_outputs[0].model_id
    version = MlflowClient(uri, registry_uri=uri).get_model_version("sweep-max", "1")
    assert version.source == f"models:/{model_id}" and version.run_id == runs["a"]

    for value in (0.20, 0.30):  # worse, then a tie: neither moves it nor registers anything
        kept = promote("b", value)
        assert (kept.outcome, kept.version) == ("kept", "1")
        assert f"not beaten by this model's {value:.4f}" in kept.message
        assert kept.message.startswith("kept v1 as sweep-max@champion (segm_AP 0.3000")
    assert promote("a", 0.30).message == "kept v1 as sweep-max@champion (it is this model)"
    other = promote("c", 0.99, metric="bbox_AP")  # another metric: not comparable
    assert other.outcome == "kept" and "not comparable with bbox_AP (max)" in other.message
    assert registry(uri, "sweep-max")[:2] == (["1"], "1")

    better = promote("c", 0.41)
    assert (better.outcome, better.version) == ("registered", "2")
    assert better.message == "registered v2 as sweep-max@champion (segm_AP 0.4100, replacing v1)"
    versions, champion, tags = registry(uri, "sweep-max")
    assert (versions, champion, tags[VALUE_TAG]) == (["1", "2"], "2", "0.41")

    skipped = promote("none", 0.9)
    assert skipped.outcome == "skipped" and runs["none"] in skipped.message
    assert registry(uri, "sweep-max")[:2] == (["1", "2"], "2")


def test_under_mode_min_lower_wins(store: dict) -> None:
    uri, runs = store["uri"], store["runs"]

    def promote(run: str, value: float) -> tracking.Promotion:
        return tracking.promote_champion(uri, "sweep-min", runs[run], "train_loss", "min", value)

    assert promote("a", 0.5).outcome == "registered"
    assert promote("b", 0.6).outcome == "kept"
    assert promote("c", 0.4).version == "2"
    assert registry(uri, "sweep-min")[1:] == (
        "2",
        {METRIC_TAG: "train_loss", VALUE_TAG: "0.4", MODE_TAG: "min"},
    )


def test_a_registry_error_is_reported_not_raised(store: dict) -> None:
    failed = tracking.promote_champion(store["uri"], "x", "no-such-run", "segm_AP", "max", 0.1)
    assert failed.outcome == "failed" and "no-such-run" in failed.message
    with pytest.raises(ValueError, match="mode 'best'"):
        tracking.promote_champion(store["uri"], "x", store["runs"]["a"], "segm_AP", "best", 0.1)
