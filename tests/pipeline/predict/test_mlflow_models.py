"""`panet predict` on MLflow models in a real SQLite store: the champion alias, and pickles.

A model logged by `panet train` (`tracking.log_model`) loads from its state dict with
`weights_only=True`. A model that has only a pickled module (logged by other code) is refused
unless `--allow-pickle` says it is trusted: a pickle whose `__reduce__` writes a marker file
shows that nothing ran before the refusal, and that the same file does run code once allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from panet_model import PANetConfig, build_panet
from pipeline import tracking
from pipeline.cli import main
from tests.pipeline.predict.conftest import CATEGORIES, assert_same_detections, tiny_model_state


class RunsCodeWhenUnpickled(nn.Linear):
    """A module whose pickle calls `exec` on load: it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        super().__init__(2, 2)
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def tiny_panet() -> tuple[nn.Module, dict]:
    """The `untrained_checkpoint` fixture's model, and the metadata `panet train` logs with it."""
    state = tiny_model_state()
    model = build_panet(PANetConfig.preset("tiny"), num_classes=len(CATEGORIES) + 1)
    model.load_state_dict(state["model"])
    card = {
        "panet": {
            "categories": [{"id": k, "name": v} for k, v in CATEGORIES.items()],
            "num_classes": len(CATEGORIES) + 1,
            "model_config": state["config"]["model"],
        }
    }
    return model.eval(), card


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tracking.resolve_tracking_uri(tmp_path_factory.mktemp("models") / "run", None)


@pytest.fixture(scope="module")
def photo(photos: dict[str, Path]) -> str:
    return str(photos["astronaut.png"])


@pytest.fixture(scope="module")
def expected(untrained_checkpoint: Path, photo: str, tmp_path_factory) -> list[dict]:
    """The checkpoint's detections of the photo."""
    out = tmp_path_factory.mktemp("from_checkpoint")
    assert main(predict_args(str(untrained_checkpoint), photo, out)) == 0
    return json.loads((out / "results.json").read_text())


def predict_args(model: str, photo: str, out: Path, *extra: str) -> list[str]:
    args = ["predict", "--model", model, photo, "--out", str(out), "--no-pictures"]
    return [*args, "--score-threshold", "0", "--max-detections", "20", "--device", "cpu", *extra]


def foreign_model(uri: str, module: nn.Module, tmp: Path, **save: object) -> str:
    """`module` saved by plain MLflow (only its pickle) into a new run's artifacts; its URI."""
    _, card = tiny_panet()
    local = tmp / "foreign_model"
    mlflow.pytorch.save_model(
        module,
        local,
        serialization_format="pickle",
        pip_requirements=["torch"],  # no inference: it would load the model
        metadata=card,
        **save,
    )
    run_id = tracking.start_or_resume_run(uri, "foreign", "foreign", None)
    MlflowClient(uri).log_artifacts(run_id, str(local), "model")
    return f"runs:/{run_id}/model"


def test_the_sweeps_champion_predicts_like_its_checkpoint(
    store: str, photo: str, expected: list[dict], tmp_path: Path, capsys
) -> None:
    model, card = tiny_panet()
    run_id = tracking.start_or_resume_run(store, "sweeps", "best-trial", None)
    tracking.log_model(store, run_id, model, metadata=card)
    promoted = tracking.promote_champion(store, "tiny-sweep", run_id, "segm_AP", "max", 0.5)
    assert promoted.outcome == "registered"
    args = predict_args("models:/tiny-sweep@champion", photo, tmp_path, "--tracking-uri", store)
    assert main(args) == 0
    assert "model models:/tiny-sweep@champion (MLflow, 3 classes)" in capsys.readouterr().out
    got = json.loads((tmp_path / "results.json").read_text())
    assert len(got) == 20
    assert_same_detections(got, expected)


def test_a_pickle_that_runs_code_is_refused(store: str, photo: str, tmp_path: Path, capsys):
    marker = tmp_path / "marker"
    uri = foreign_model(store, RunsCodeWhenUnpickled(marker), tmp_path)
    assert not marker.exists()
    args = predict_args(uri, photo, tmp_path / "out", "--tracking-uri", store)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"MLflow model {uri!r} holds no weights file" in err and "--allow-pickle" in err
    assert not marker.exists(), "the refused pickle ran"
    # The file is a real attack: allowed, it runs (and then is no model).
    assert main([*args, "--allow-pickle"]) == 2
    assert marker.read_text() == "ran"


def test_a_weights_file_that_runs_code_is_refused_even_with_allow_pickle(
    store: str, photo: str, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "marker"
    weights = tmp_path / tracking.WEIGHTS_PATH.split("/")[-1]
    torch.save({"w": RunsCodeWhenUnpickled(marker)}, weights)
    uri = foreign_model(store, nn.Linear(2, 2), tmp_path, extra_files=[str(weights)])
    local = str(tmp_path / "foreign_model")  # the model directory itself, no store
    for model in (local, uri):
        args = predict_args(model, photo, tmp_path / "out", "--allow-pickle")
        assert main([*args, "--tracking-uri", store] if model == uri else args) == 2
        err = capsys.readouterr().err
        assert f"model {model!r}: its weights file {tracking.WEIGHTS_PATH} cannot be read" in err
        assert not marker.exists(), "the weights file ran code"


def test_allow_pickle_loads_a_trusted_foreign_model(
    store: str, photo: str, expected: list[dict], tmp_path: Path, capsys
) -> None:
    model, _ = tiny_panet()
    uri = foreign_model(store, model, tmp_path)
    args = predict_args(uri, photo, tmp_path / "out", "--tracking-uri", store)
    assert main(args) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*args, "--allow-pickle"]) == 0
    assert_same_detections(json.loads((tmp_path / "out" / "results.json").read_text()), expected)
