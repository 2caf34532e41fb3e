"""Tests for `pipeline.tracking` against a real MLflow: the local SQLite store, and a real
`mlflow server` subprocess on a free localhost port (started once for the module).

Everything is read back through a plain `MlflowClient`, never through the module under test.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline import tracking
from pipeline.tracking import metrics as tracking_metrics
from tests.mlflow_server import free_port, stop_group


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No tracking URI from the environment; the working directory is a temporary one, so a
    stray default store (./mlflow.db) would land there, and is checked for."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield
    assert not (work / "mlflow.db").exists(), "something used MLflow's global default store"


@pytest.fixture(scope="module")
def server_uri(mlflow_uri: str) -> str:
    """The session's `mlflow server` (tests/conftest.py): SQLite, proxied artifacts."""
    return mlflow_uri


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local store for the module (creating one runs MLflow's migrations, ~2 s); tests keep
    apart by experiment name."""
    return tmp_path_factory.mktemp("local") / "run"


@pytest.fixture
def local_uri(local_dir: Path) -> str:
    return tracking.resolve_tracking_uri(local_dir, None)


@pytest.fixture(params=["sqlite", "server"])
def uri(request: pytest.FixtureRequest) -> str:
    if request.param == "server":
        return request.getfixturevalue("server_uri")
    return request.getfixturevalue("local_uri")


# ---------------------------------------------------------------------------------------------
# Where runs go


def test_resolve_tracking_uri_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "a" / "job"
    default = tracking.resolve_tracking_uri(run_dir, None)
    assert default == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute path: four slashes
    assert tracking.resolve_tracking_uri(run_dir, "") == default
    assert tracking.resolve_tracking_uri(run_dir, "http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri(run_dir, "http://mlflow:5000") == "http://env:5000"
    assert (
        tracking.default_artifact_location(default) == (run_dir.resolve() / "mlartifacts").as_uri()
    )
    assert tracking.default_artifact_location("http://env:5000") is None


def test_local_store_keeps_artifacts_beside_the_database(tmp_path: Path) -> None:
    uri = tracking.resolve_tracking_uri(tmp_path / "run", None)
    run_id = tracking.start_or_resume_run(uri, "exp", "job", None, tags={"job": "job"})
    assert (tmp_path / "run" / "mlflow.db").is_file()
    client = MlflowClient(uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.name == "exp"
    assert experiment.artifact_location == (tmp_path / "run" / "mlartifacts").resolve().as_uri()
    tracking.log_dict(uri, run_id, {"a": 1}, "config/c.json")
    files = list((tmp_path / "run" / "mlartifacts").rglob("c.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == {"a": 1}


# ---------------------------------------------------------------------------------------------
# The same behaviour on SQLite and on a server


def test_params_metrics_artifacts_read_back(uri: str, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    run_id = tracking.start_or_resume_run(uri, "roundtrip", "job", None, tags={"job": "j"})
    tracking.log_params(
        uri, run_id, {"solver.lr": 0.02, "sizes": [32, 64], "name": "tiny", "long": "x" * 7000}
    )
    for step in (10, 20, 30):
        logged = tracking.log_metrics(
            uri, run_id, {"train/loss": 1.0 / step, "bbox/AP": torch.tensor(step / 100)}, step
        )
        assert logged == 2
    tracking.log_metrics(uri, run_id, {"train/loss": float("nan")}, 40)

    picture = tmp_path / "pic.png"
    from PIL import Image

    Image.new("RGB", (8, 6), (255, 0, 0)).save(picture)
    assert tracking.log_artifact_file(uri, run_id, picture, "predictions") == "predictions/pic.png"
    tracking.log_dict(uri, run_id, {"shares": np.eye(2)}, "level_share/shares.json")
    tracking.log_image(uri, run_id, np.zeros((4, 5, 3), np.uint8), "images/zeros.png")
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    tracking.log_figure(uri, run_id, fig, "figures/line.png")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "job"
    assert run.data.tags["job"] == "j"
    params = run.data.params
    assert params["solver.lr"] == "0.02"
    assert json.loads(params["sizes"]) == [32, 64]
    assert params["name"] == "tiny"
    assert len(params["long"]) == tracking.MAX_PARAM_VALUE_LENGTH and params["long"].endswith("...")
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 30, 40]
    assert [m.value for m in history][:3] == pytest.approx([0.1, 0.05, 1 / 30])
    assert math.isnan(history[-1].value)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "bbox/AP")] == [
        (10, pytest.approx(0.1)),
        (20, pytest.approx(0.2)),
        (30, pytest.approx(0.3)),
    ]
    top = {f.path for f in client.list_artifacts(run_id)}
    assert top == {"predictions", "level_share", "images", "figures"}
    assert [f.path for f in client.list_artifacts(run_id, "predictions")] == ["predictions/pic.png"]
    assert [f.path for f in client.list_artifacts(run_id, "figures")] == ["figures/line.png"]
    local = client.download_artifacts(run_id, "level_share/shares.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == {"shares": [[1.0, 0.0], [0.0, 1.0]]}
    with Image.open(client.download_artifacts(run_id, "images/zeros.png", str(tmp_path))) as img:
        assert img.size == (5, 4)


def test_resume_reuses_the_run(uri: str) -> None:
    first = tracking.start_or_resume_run(uri, "resume", "job", None, tags={"job": "job"})
    tracking.log_params(uri, first, {"lr": 0.1, "steps": 100})
    tracking.log_metrics(uri, first, {"train/loss": 2.0}, 5)
    tracking.finish_run(uri, first, "FAILED")
    client = MlflowClient(uri)
    assert client.get_run(first).info.status == "FAILED"

    again = tracking.start_or_resume_run(uri, "resume", "job", first, tags={"job": "job"})
    assert again == first
    assert client.get_run(first).info.status == "RUNNING"
    experiment_id = client.get_run(first).info.experiment_id
    assert len(client.search_runs([experiment_id])) == 1
    # Same values again: fine. A changed value: kept, the new one in a tag, no exception.
    assert tracking.log_params(uri, first, {"lr": 0.1, "steps": 100}) == {}
    with pytest.warns(RuntimeWarning, match="steps"):
        changed = tracking.log_params(uri, first, {"lr": 0.1, "steps": 200, "new": "yes"})
    assert changed == {"steps": "200"}
    run = client.get_run(first)
    assert run.data.params == {"lr": "0.1", "steps": "100", "new": "yes"}
    assert run.data.tags["param_changed.steps"] == "200"
    tracking.log_metrics(uri, first, {"train/loss": 1.0}, 6)
    assert [m.step for m in client.get_metric_history(first, "train/loss")] == [5, 6]
    tracking.finish_run(uri, first, "FINISHED")
    assert client.get_run(first).info.status == "FINISHED"
    assert len(client.search_runs([experiment_id])) == 1


def test_log_model_loads_back(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A user's global MLflow setting must survive the scoped switch log_model makes.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///elsewhere.db")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).train()
    run_id = tracking.start_or_resume_run(uri, "models", "job", None)
    tracking.log_params(uri, run_id, {"lr": 0.1})
    tracking.log_metrics(uri, run_id, {"segm/AP": 0.25}, 7)
    model_uri = tracking.log_model(uri, run_id, model, step=7, registered_model_name="tiny-linear")
    assert model_uri.startswith("models:/m-")
    assert model.training, "train/eval mode is restored"
    assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///elsewhere.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ

    x = torch.randn(5, 3)
    model.eval()
    for ref in (model_uri, f"runs:/{run_id}/model", "models:/tiny-linear/1"):
        loaded = tracking.load_pickled_model(uri, ref)
        assert torch.equal(loaded(x), model(x)), ref
        weights = tracking.load_weights(uri, ref)  # the same, without unpickling
        assert weights is not None and weights.keys() == model.state_dict().keys(), ref
        for key, value in model.state_dict().items():
            assert torch.equal(weights[key], value), (ref, key)
    client = MlflowClient(uri)
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    run = client.get_run(run_id)
    assert logged.experiment_id == run.info.experiment_id  # not the Default experiment
    assert logged.source_run_id == run_id
    assert logged.status.to_proto() == logged.status.READY.to_proto()
    assert [m.key for m in logged.metrics or []] == ["segm/AP"]  # linked at step 7
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    version = MlflowClient(uri, registry_uri=uri).get_model_version("tiny-linear", "1")
    assert version.run_id == run_id


# ---------------------------------------------------------------------------------------------
# Failures


def test_missing_run_id_starts_a_new_run(local_uri: str) -> None:
    uri = local_uri
    tracking.start_or_resume_run(uri, "exp", "job", None)
    with pytest.warns(RuntimeWarning, match="starting a new run"):
        run_id = tracking.start_or_resume_run(uri, "exp", "job", "0" * 32)
    assert run_id != "0" * 32
    assert MlflowClient(uri).get_run(run_id).data.tags["resumed_from_missing_run"] == "0" * 32


def test_unreachable_server_fails_fast_naming_the_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailableError, match=uri.replace(".", r"\.")):
        tracking.start_or_resume_run(uri, "exp", "job", None)
    assert time.monotonic() - t0 < 10


def test_unusable_sqlite_path_fails_naming_the_uri(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker}/sub/mlflow.db"
    with pytest.raises(tracking.TrackingUnavailableError, match="mlflow.db"):
        tracking.start_or_resume_run(uri, "exp", "job", None)


def test_metrics_never_raise_when_the_server_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's own HTTP retries would take ~4 minutes: none here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(RuntimeWarning, match="dropped 2 metrics at step 3") as record:
        assert tracking.log_metrics(uri, "f" * 32, {"a": 1.0, "b": 2.0}, 3) == 0
    assert uri in str(record[-1].message) and "not logging metrics" in str(record[-1].message)
    assert not any("retrying" in str(w.message) for w in record)  # MLflow retries HTTP itself
    # Offline now: the next batches are dropped at once, without a request.
    real = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda *a, **k: pytest.fail("tried again"))
    assert tracking.log_metrics(uri, "f" * 32, {"a": 1.0}, 4) == 0
    # After the cool-down it tries again.
    monkeypatch.setitem(tracking_metrics._offline_until, uri, 0.0)
    with pytest.raises(pytest.fail.Exception, match="tried again"):
        tracking.log_metrics(uri, "f" * 32, {"a": 1.0}, 5)
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    with pytest.warns(RuntimeWarning) as record:
        tracking.finish_run(uri, "f" * 32, "KILLED")
    assert "could not mark" in str(record[-1].message)


def test_metrics_retry_a_transient_failure(local_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = local_uri
    run_id = tracking.start_or_resume_run(uri, "exp", "job", None)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    real = MlflowClient.log_batch
    calls = []

    def flaky(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("server restarting")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    with pytest.warns(RuntimeWarning, match="retrying"):
        assert tracking.log_metrics(uri, run_id, {"train/loss": 0.5}, 1) == 1
    assert len(calls) == 2
    assert [m.value for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")] == [0.5]


def test_batches_and_name_sanitising(local_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = local_uri
    run_id = tracking.start_or_resume_run(uri, "exp", "job", None)
    real = MlflowClient.log_batch
    sizes: list[tuple[int, int]] = []

    def counting(self, rid, metrics=(), params=(), tags=(), **kw):  # type: ignore[no-untyped-def]
        sizes.append((len(metrics), len(params)))
        return real(self, rid, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    tracking.log_params(uri, run_id, {f"p{i:03d}": i for i in range(250)})
    assert [p for _, p in sizes] == [100, 100, 50]
    sizes.clear()
    assert tracking.log_metrics(uri, run_id, {f"m/{i:04d}": i for i in range(2500)}, 0) == 2500
    assert [m for m, _ in sizes] == [1000, 1000, 500]
    with pytest.warns(RuntimeWarning, match="not a number"):
        n = tracking.log_metrics(uri, run_id, {"bad name!": 1, "/a//b/../c": 2, "s": "x"}, 1)
    assert n == 2
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["bad name_"] == 1 and metrics["a/b/c"] == 2
    assert len(MlflowClient(uri).get_run(run_id).data.params) == 250


def test_finish_run_rejects_unknown_status(local_uri: str) -> None:
    with pytest.raises(ValueError, match="status"):
        tracking.finish_run(local_uri, "x" * 32, "DONE")


# ---------------------------------------------------------------------------------------------
# The UI


def test_ui_urls_and_command(local_uri: str, local_dir: Path) -> None:
    uri = local_uri
    run_id = tracking.start_or_resume_run(uri, "exp", "job", None)
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    assert tracking.run_page_url(uri, run_id) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    )
    assert tracking.run_page_url("http://mlflow.internal:8080/", "r1", "7") == (
        "http://mlflow.internal:8080/#/experiments/7/runs/r1"
    )
    assert tracking.run_page_url(uri, "0" * 32) == f"http://127.0.0.1:5000/#/runs/{'0' * 32}"
    command = tracking.ui_command(uri)
    mlflow = shlex.quote(tracking.script_command("mlflow"))
    assert command == (
        f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {mlflow} server "
        f"--backend-store-uri {uri} "
        f"--default-artifact-root {(local_dir / 'mlartifacts').resolve().as_uri()} "
        "--host 127.0.0.1 --port 5000 --workers 1"
    )
    assert tracking.ui_command("http://mlflow:5000") == (
        f"{shlex.quote(sys.executable)} -m webbrowser http://mlflow:5000"
    )


def test_printed_commands_run_without_the_venv_on_path() -> None:
    """From a virtual env, printed commands name its scripts by absolute path."""
    assert sys.prefix != sys.base_prefix, "the tests run from the project's venv"
    mlflow = tracking.script_command("mlflow")
    assert Path(mlflow).is_absolute() and Path(mlflow).is_file()
    assert tracking.script_command("no-such-script") == "no-such-script"
    shell = shutil.which("sh")
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    out = subprocess.run([shell, "-c", f"{shlex.quote(mlflow)} --version"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_ui_command_serves_the_run_page(local_uri: str, tmp_path: Path) -> None:
    """The printed command, run by a shell without the venv on PATH, serves the store and run."""
    uri = local_uri
    run_id = tracking.start_or_resume_run(uri, "exp", "job", None)
    tracking.log_metrics(uri, run_id, {"bbox/AP": 0.5}, 1)
    port = free_port()
    command = tracking.ui_command(uri, port=port)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.Popen([shutil.which("sh"), "-c", command], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "UI did not start"
                time.sleep(0.25)
        url = tracking.run_page_url(uri, run_id, ui_base=base)
        with urllib.request.urlopen(url.split("#")[0], timeout=10) as page:
            assert b"MLflow" in page.read()
        api = f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}"
        with urllib.request.urlopen(api, timeout=10) as answer:
            run = json.load(answer)["run"]
        assert run["data"]["metrics"][0]["key"] == "bbox/AP"
    finally:
        stop_group(proc)


# ---------------------------------------------------------------------------------------------
# The real model


def test_log_panet_tiny_loads_back(local_uri: str) -> None:
    from panet_model import PANetConfig, build_panet

    torch.manual_seed(0)
    model = build_panet(PANetConfig.preset("tiny"), num_classes=4).eval()
    uri = local_uri
    run_id = tracking.start_or_resume_run(uri, "panet", "tiny", None)
    model_uri = tracking.log_model(uri, run_id, model)
    loaded = tracking.load_pickled_model(uri, model_uri)
    images = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        want, got = model(images)[0], loaded(images)[0]
    assert set(got) == {"boxes", "labels", "scores", "masks"}
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_open_run_resumes_the_recorded_run_of_its_own_store(local_uri: str, tmp_path: Path) -> None:
    """The one way jobs and sweeps open a run: the record file names the run a re-run resumes;
    a record of another store is not followed."""
    record = tmp_path / "job" / "mlflow_run.json"
    first_uri = local_uri
    first = tracking.open_run(record, first_uri, "rec", "job", {"job": "job"}, "panet train", "c0")
    assert json.loads(record.read_text()) == {"run_id": first, "tracking_uri": first_uri}
    tracking.finish_run(first_uri, first)
    again = tracking.open_run(record, first_uri, "rec", "job", {"k": "v"}, "panet tune", "unknown")
    run = MlflowClient(first_uri).get_run(again)
    assert again == first and run.info.status == "RUNNING"
    assert run.data.tags["k"] == "v" and run.data.tags["mlflow.source.name"] == "panet tune"
    assert run.data.tags["mlflow.source.git.commit"] == "c0"  # "unknown" sets no commit
    record.write_text(json.dumps({"run_id": first, "tracking_uri": "http://elsewhere:5000"}))
    other = tracking.open_run(record, first_uri, "rec", "job", {}, "panet train", "c1")
    assert other != first and MlflowClient(first_uri).get_run(other).info.run_name == "job"
    assert json.loads(record.read_text()) == {"run_id": other, "tracking_uri": first_uri}
