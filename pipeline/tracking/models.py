"""Trained models in MLflow: log (a LoggedModel of the run), load, read metadata, register.

A model is logged twice over in one MLflow model: MLflow's pytorch flavor (the pickled module,
for `mlflow.pytorch.load_model` and MLflow's tools) and its state dict in `WEIGHTS_PATH`.
`load_weights` reads the state dict with `weights_only=True`, which runs no code from the file;
unpickling the module (`load_pickled_model`) runs any code its author put in it: only for models
from a trusted source.

`mlflow.pytorch` reads MLflow's process-global tracking URI, so these functions point it at
their `tracking_uri` for the call (`_global_tracking_uri`) and put it back, under a lock.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking.store import mlflow_client, retry

if TYPE_CHECKING:
    from torch import nn

WEIGHTS_FILE = "panet_weights.pt"  # the state dict, saved with plain tensors only
WEIGHTS_PATH = f"extra_files/{WEIGHTS_FILE}"  # where MLflow puts it inside the model

# `mlflow.pytorch.log_model` reads MLflow's process-global tracking URI: serialise its callers.
_global_uri_lock = threading.Lock()


@contextmanager
def _global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking and registry URIs at `tracking_uri` for a block.

    `mlflow.set_tracking_uri(None)` would also delete the MLFLOW_TRACKING_URI environment
    variable, so the previous module globals and environment are saved and put back exactly.
    """
    # deferred: `panet --help` imports this module (via submit); mlflow, torch only when used
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    with _global_uri_lock:
        saved_env = {k: os.environ.get(k) for k in env_keys}
        saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
        saved_registry = getattr(registry_utils, "_registry_uri", None)
        try:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
            yield
        finally:
            if saved_tracking is not None:
                mlflow.set_tracking_uri(saved_tracking)
            else:  # set_tracking_uri(None) would unset MLFLOW_TRACKING_URI (restored below)
                tracking_utils._tracking_uri = None
            registry_utils._registry_uri = saved_registry
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def model_pip_requirements() -> list[str]:
    """Pinned requirements of a logged PANet model, from the installed versions.

    Passing them explicitly skips MLflow's requirement inference, which loads the model in a
    subprocess to see what it imports (slow for a big model) and may consult PyPI.
    """

    import mlflow.pytorch

    reqs = list(mlflow.pytorch.get_default_pip_requirements())  # torch, cloudpickle
    for dist in ("torchvision", "numpy"):
        with suppress(metadata.PackageNotFoundError):
            reqs.append(f"{dist}=={metadata.version(dist)}")
    return reqs


def log_model(
    tracking_uri: str,
    run_id: str,
    model: nn.Module,
    name: str = "model",
    *,
    step: int = 0,
    registered_model_name: str | None = None,
    pip_requirements: list[str] | None = None,
    code_paths: list[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Log a trained model with `mlflow.pytorch`, loadable back by the returned URI.

    Saved in MLflow's "pickle" format (the whole module; its class must be importable where it
    is loaded, or shipped with `code_paths`): the default "pt2" format needs torch.export,
    which cannot trace a detector taking a list of images of varying size. Its state dict goes
    beside it (`WEIGHTS_PATH`), for `load_weights`. Saved on the CPU in eval mode (it loads
    on a machine without a GPU), then put back. In MLflow 3 the model is a LoggedModel of the
    run's experiment, linked to the run and to the run's metrics at `step`.

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        model: the module (unwrapped from DDP).
        name: the model's name; also loadable as `runs:/<run_id>/<name>`.
        step: the training step the model is from.
        registered_model_name: also register it as a new version of this registered model.
        pip_requirements: requirements to record; default `model_pip_requirements()`.
        code_paths: local files or folders to ship with the model, added to sys.path on load.
        metadata: YAML-able values stored in the model's MLmodel file (`model_metadata`).

    Returns:
        The model URI, `models:/<model_id>`: `mlflow.pytorch.load_model(uri)` loads it.
    """
    import mlflow.pytorch

    model_id = _create_logged_model(tracking_uri, run_id, name)
    with (
        _on_cpu_for_eval(model),
        _state_dict_file(model) as weights,
        _global_tracking_uri(tracking_uri),
    ):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            run_id=run_id,
            model_id=model_id,
            step=step,
            serialization_format="pickle",
            pip_requirements=pip_requirements or model_pip_requirements(),
            code_paths=code_paths,
            extra_files=[str(weights)],
            registered_model_name=registered_model_name,
            await_registration_for=0,
            metadata=dict(metadata) if metadata else None,
        )
    return str(info.model_uri)


def _create_logged_model(tracking_uri: str, run_id: str, name: str) -> str:
    """A LoggedModel of the run's experiment, linked to the run and its params; its id."""
    client = mlflow_client(tracking_uri)
    run = retry(lambda: client.get_run(run_id), "get_run")
    # Created here, in the run's experiment: left to MLflow, a LoggedModel goes to the
    # process's active experiment, which is the Default experiment "0" in a Ray worker.
    logged = retry(
        lambda: client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params=dict(run.data.params),
        ),
        "create_logged_model",
    )
    return str(logged.model_id)


@contextmanager
def _on_cpu_for_eval(model: nn.Module) -> Iterator[None]:
    """The model on the CPU in eval mode for a block, then back on its device and mode."""
    import torch

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.cpu().eval()
    try:
        yield
    finally:
        model.to(device).train(was_training)


@contextmanager
def _state_dict_file(model: nn.Module) -> Iterator[Path]:
    """The model's state dict saved in a temporary `WEIGHTS_FILE`, for a block."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        torch.save(model.state_dict(), path)
        yield path


def load_weights(tracking_uri: str, model_uri: str) -> dict[str, Any] | None:
    """The state dict logged with a model (`WEIGHTS_PATH`), read with `weights_only=True`.

    Args:
        tracking_uri: the store the model was logged to ("" for a local model directory).
        model_uri: `models:/<model_id>`, `models:/<name>/<version>`, `models:/<name>@<alias>`,
            `runs:/<run_id>/<name>` or a local model directory.

    Returns:
        {parameter or buffer name: tensor}, or None if the model has no weights file (a model
        logged by other code: only its pickled module, see `load_pickled_model`).

    Raises:
        ValueError: naming the model, if its weights file holds anything but plain tensors.
    """
    import mlflow.artifacts
    import torch
    from mlflow.models import Model
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    with _scoped(tracking_uri):
        flavor = Model.load(model_uri).flavors.get("pytorch") or {}
        listed = {f.get("path") for f in flavor.get("extra_files") or [] if isinstance(f, dict)}
        if WEIGHTS_PATH not in listed:
            return None
        root = model_uri  # a registered version or LoggedModel: where its files are
        if model_uri.startswith("models:/"):
            root = ModelsArtifactRepository.get_underlying_uri(model_uri)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(root) / WEIGHTS_PATH
            if not local.is_file():
                local = Path(
                    mlflow.artifacts.download_artifacts(f"{root}/{WEIGHTS_PATH}", dst_path=tmp)
                )
            try:
                state = torch.load(local, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch raises several types; re-raised
                raise ValueError(
                    f"MLflow model {model_uri!r}: its weights file {WEIGHTS_PATH} cannot be read "
                    f"safely (torch.load weights_only=True): {str(err)[:300]}"
                ) from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"MLflow model {model_uri!r}: {WEIGHTS_PATH} is not a state dict")
    return state


def load_pickled_model(tracking_uri: str, model_uri: str, map_location: str = "cpu") -> nn.Module:
    """Unpickle a model's module with `mlflow.pytorch.load_model`: this runs any code the
    pickle carries, so only for a model from a trusted source (`load_weights` runs none).

    Args:
        tracking_uri: the store the model was logged to ("" for a local model directory).
        model_uri: as for `load_weights`.
        map_location: torch device for the weights.

    Returns:
        The module, in eval mode.
    """
    import mlflow.pytorch

    with _scoped(tracking_uri):
        model = mlflow.pytorch.load_model(model_uri, map_location=map_location)
    return model.eval()


def model_metadata(tracking_uri: str, model_uri: str) -> dict[str, Any]:
    """The `metadata` a model was logged with (`log_model`); {} if none. Reads its MLmodel
    file (YAML) only.

    Args:
        tracking_uri: the store the model was logged to ("" for a local model directory).
        model_uri: `models:/...`, `runs:/...` or a local model directory.
    """
    import mlflow.models

    with _scoped(tracking_uri):
        info = mlflow.models.get_model_info(model_uri)
    return dict(info.metadata or {})


def _scoped(tracking_uri: str) -> AbstractContextManager[None]:
    """`_global_tracking_uri`, or nothing for a local model directory (no store)."""
    return _global_tracking_uri(tracking_uri) if tracking_uri else nullcontext()


def register_model(tracking_uri: str, model_uri: str, name: str) -> str:
    """Register a logged model as a new version of the registered model `name` (created if new).

    Args:
        tracking_uri: the store the model was logged to (its registry is used).
        model_uri: `models:/<model_id>` or `runs:/<run_id>/<name>`.
        name: the registered model's name.

    Returns:
        The version, as a string ("1", "2", ...): load it as `models:/<name>/<version>`.
    """
    import mlflow

    with _global_tracking_uri(tracking_uri):
        version = mlflow.register_model(model_uri, name, await_registration_for=0)
    return str(version.version)
