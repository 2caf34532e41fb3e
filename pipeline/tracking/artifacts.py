"""A run's artifacts: files and folders, JSON, images and matplotlib figures.

With an `outbox.Outbox` open for the run, a file is copied into its journal and uploaded by the
sender (`outbox.py`); otherwise it is uploaded at once, with retries, and a failure raises.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking import journal
from pipeline.tracking.store import mlflow_client, retry

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure


def _split_artifact_file(artifact_file: str) -> tuple[str | None, str]:
    """ "a/b/c.png" -> ("a/b", "c.png"); MLflow uploads a local file under its own basename."""
    artifact_file = artifact_file.strip("/")
    folder, name = posixpath.split(artifact_file)
    if not name:
        raise ValueError(f"artifact_file must name a file, got {artifact_file!r}")
    return (folder or None), name


def log_artifact_file(
    tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None
) -> str:
    """Upload a local file (or a whole folder) to the run's artifacts.

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        path: the local file or folder.
        artifact_path: the artifact folder to put it in (None: the root).

    Returns:
        The artifact's path inside the run, e.g. "predictions/step_100.png".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file to log as an MLflow artifact: {path}")
    if not journal.put(tracking_uri, run_id, "artifact", path, artifact_path=artifact_path):
        client = mlflow_client(tracking_uri)
        if path.is_dir():
            retry(lambda: client.log_artifacts(run_id, str(path), artifact_path), "log_artifacts")
        else:
            retry(lambda: client.log_artifact(run_id, str(path), artifact_path), "log_artifact")
    return posixpath.join(artifact_path, path.name) if artifact_path else path.name


@contextmanager
def _staged(artifact_file: str) -> Iterator[tuple[Path, str | None]]:
    """A temporary local path with the artifact's file name, and its artifact folder."""
    folder, name = _split_artifact_file(artifact_file)
    with tempfile.TemporaryDirectory(prefix="panet-mlflow-") as tmp:
        yield Path(tmp) / name, folder


def _jsonable(obj: Any) -> Any:
    """json.dumps fallback for numpy arrays and scalars, tensors and paths."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def log_dict(tracking_uri: str, run_id: str, obj: Any, artifact_file: str) -> str:
    """Log a JSON-serialisable object (numpy arrays and tensors become lists) as a JSON file.

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        obj: the object.
        artifact_file: its path inside the run's artifacts, e.g. "config/resolved.json".

    Returns:
        `artifact_file`.
    """
    with _staged(artifact_file) as (local, folder):
        local.write_text(json.dumps(obj, indent=2, default=_jsonable, allow_nan=True) + "\n")
        log_artifact_file(tracking_uri, run_id, local, folder)
    return artifact_file.strip("/")


def log_image(
    tracking_uri: str, run_id: str, image: str | Path | np.ndarray, artifact_file: str
) -> str:
    """Log a PNG file, or an image array written as PNG.

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        image: a file path, or an (H, W) / (H, W, 3|4) uint8 array (floats in [0, 1] are scaled).
        artifact_file: its path inside the run's artifacts, e.g. "predictions/step_100.png".

    Returns:
        `artifact_file`.
    """
    with _staged(artifact_file) as (local, folder):
        if isinstance(image, (str, Path)):
            shutil.copyfile(image, local)
        else:
            # deferred: `panet --help` imports this module (via submit); PIL, numpy only to log an image
            import numpy as np
            from PIL import Image

            array = np.asarray(image)
            if array.dtype != np.uint8:
                array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
            Image.fromarray(array).save(local)
        log_artifact_file(tracking_uri, run_id, local, folder)
    return artifact_file.strip("/")


def log_figure(tracking_uri: str, run_id: str, figure: Figure, artifact_file: str) -> str:
    """Log a matplotlib figure, saved in the format its file name says (PNG, SVG, PDF).

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        figure: the figure (left open: the caller owns it).
        artifact_file: its path inside the run's artifacts.

    Returns:
        `artifact_file`.
    """
    with _staged(artifact_file) as (local, folder):
        figure.savefig(local)
        log_artifact_file(tracking_uri, run_id, local, folder)
    return artifact_file.strip("/")
