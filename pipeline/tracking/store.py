"""Where a job's runs go, how to reach that store, and how to see it in the MLflow UI.

Every function of `pipeline.tracking` takes the tracking URI explicitly and talks to it through its
own `MlflowClient(tracking_uri)` (`mlflow_client`), never through MLflow's fluent global state
(`mlflow.set_tracking_uri`, `mlflow.start_run`): the Ray Train worker process is long-lived, may
run several Tune trials one after another, and other libraries in it (Ray's MLflow callbacks) use
that global state too. The one exception is `models.log_model` and its readers, whose MLflow
implementation reads the global tracking URI; they set and restore it under a lock.

MLflow is imported inside the functions so importing the package stays cheap.
"""

from __future__ import annotations

import os
import shlex
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")

DEFAULT_UI_PORT = 5000


class TrackingUnavailableError(ValueError):
    """The tracking URI cannot be used. A `ValueError` so the `panet` commands report it as a
    configuration error with its message (which names the URI) instead of a traceback."""


def resolve_tracking_uri(run_dir: Any, configured: str | None) -> str:
    """The tracking URI for a job.

    Args:
        run_dir: the job's directory; the local default store lives there.
        configured: the job config's URI; None or "" for the default.

    Returns:
        `MLFLOW_TRACKING_URI` if set, else `configured`, else `sqlite:///<run_dir>/mlflow.db`
        (absolute, so `sqlite:////abs/run_dir/mlflow.db`). MLflow 3.17 no longer accepts a plain
        file store for new data, hence SQLite; its artifacts go to `<run_dir>/mlartifacts`
        (see `default_artifact_location`).

    Raises:
        ValueError: no URI is set and `run_dir` is object storage (no place for SQLite).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if configured and configured.strip():
        return configured.strip()
    if "://" in str(run_dir):
        raise ValueError(
            f"config key 'tracking.uri': the default MLflow store is a SQLite file in the job "
            f"directory, and {str(run_dir)!r} is object storage; set tracking.uri (or "
            "MLFLOW_TRACKING_URI) to a tracking server, e.g. http://mlflow:5000"
        )
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a local `sqlite:///` URI (None for any other kind of store)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    # SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db; drop any ?query.
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for experiments this module creates in a store.

    Args:
        tracking_uri: the tracking URI.

    Returns:
        `file://<db dir>/mlartifacts` for a local SQLite store, so artifacts sit beside the
        database instead of in whatever directory the process happened to start in; None for a
        server, which decides itself (usually `mlflow-artifacts:/`, proxied to its
        `--artifacts-destination`).
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").as_uri()


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client bound to `tracking_uri` for runs and the model registry alike."""
    # deferred: `panet --help` imports this module (via submit); mlflow only when used
    from mlflow import MlflowClient

    # Passing registry_uri too keeps model registration on the same store as the runs, whatever
    # MLFLOW_REGISTRY_URI or a previous mlflow.set_registry_uri in this process says.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_http(tracking_uri: str) -> bool:
    """A tracking server (http or https), as opposed to a local store."""
    return tracking_uri.startswith(("http://", "https://"))


def own_attempts(tracking_uri: str) -> int:
    """Our tries per call. An HTTP store gets one: MLflow's HTTP session already retries
    connection errors and 5xx answers with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7,
    about 4 minutes in all), and retrying that again would stall a training step for 12."""
    return 1 if is_http(tracking_uri) else 3


def is_client_error(err: BaseException) -> bool:
    """A request MLflow rejected (bad value, missing run): retrying cannot help."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        try:
            return 400 <= err.get_http_status_code() < 500
        except Exception:
            return False
    return isinstance(err, (TypeError, ValueError))


def retry(fn: Callable[[], T], what: str, attempts: int = 3, base_delay: float = 1.0) -> T:
    """Call `fn`, retrying failures that are not client errors with exponential backoff.

    For an HTTP store MLflow's own HTTP session already retries connection errors and 5xx
    answers (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, backoff factor 2); these retries add
    cover for a server that restarts and for SQLite's "database is locked" between the driver
    and the rank-0 worker, which write to the same file.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if is_client_error(err) or attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt
            warnings.warn(
                f"MLflow {what} failed ({type(err).__name__}: {short_error(err)}); "
                f"retrying in {delay:.0f} s",
                RuntimeWarning,
                stacklevel=3,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def short_error(err: BaseException, limit: int = 300) -> str:
    """An error's message on one line, at most `limit` characters, for warnings."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ui_base(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{DEFAULT_UI_PORT}"


def run_page_url(
    tracking_uri: str,
    run_id: str,
    experiment_id: str | None = None,
    *,
    ui_base: str | None = None,
) -> str:
    """The URL of the run's page in the MLflow UI.

    MLflow 3.17's UI routes with a hash: `<base>/#/experiments/<exp id>/runs/<run id>` is the
    run page (overview: params, metrics, tags, logged models; tabs for model metric charts and
    artifacts). Opening the experiment instead lands on a GenAI view with the training runs
    one click away, so link the run directly.

    Args:
        tracking_uri: the run's store; an http(s) server URI is also the UI's base URL.
        run_id: the run.
        experiment_id: looked up in the store if None; if that fails the UI's experiment-less
            route `<base>/#/runs/<run id>` is used, which redirects to the same page.
        ui_base: the UI's base URL; default the server URI, or the `ui_command` address for a
            local store.

    Returns:
        The URL.
    """
    base = (ui_base or _ui_base(tracking_uri)).rstrip("/")
    if experiment_id is None:
        try:
            experiment_id = mlflow_client(tracking_uri).get_run(run_id).info.experiment_id
        except Exception:
            return f"{base}/#/runs/{run_id}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def script_command(name: str) -> str:
    """How to start console script `name` from a shell, as printed for the user.

    In a virtual environment the script's absolute path: its `bin/` is on PATH only while the
    environment is activated. Elsewhere the bare name (installed on PATH).
    """
    if sys.prefix != sys.base_prefix:
        path = Path(sysconfig.get_path("scripts")) / name
        if path.is_file():
            return str(path)
    return name


def ui_command(tracking_uri: str, port: int = DEFAULT_UI_PORT) -> str:
    """The shell command that shows the runs of `tracking_uri` in the MLflow UI.

    For a local SQLite store: `mlflow server` on that database, its artifact folder as default
    root (experiments created here record their own `file://` location, which the server reads
    directly), bound to localhost, kept light for a laptop: one web worker (the 3.17 default is
    4) and no job execution (by default 3.17 also starts seven huey job consumers, used only by
    GenAI features). For a server URI, the UI is already there: the command opens it in a
    browser.

    Args:
        tracking_uri: the store.
        port: the port for a local UI (must match `run_page_url`'s default base).

    Returns:
        A command line, quoted for a POSIX shell.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return shlex.join([sys.executable, "-m", "webbrowser", tracking_uri])
    args = ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", script_command("mlflow"), "server"]
    args += ["--backend-store-uri", tracking_uri]
    artifacts = default_artifact_location(tracking_uri)
    if artifacts is not None:
        args += ["--default-artifact-root", artifacts]
    args += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return shlex.join(args)
