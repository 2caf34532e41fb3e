"""MLflow tracking for training runs: one run per job, logged from rank 0 and the driver.

Every function takes the tracking URI explicitly and talks to it through its own
`MlflowClient(tracking_uri)`, never through MLflow's fluent global state (`mlflow.set_tracking_uri`,
`mlflow.start_run`): the Ray Train worker process is long-lived, may run several Tune trials one
after another, and other libraries in it (Ray's MLflow callbacks) use that global state too. The
one exception is `log_model`, whose MLflow implementation reads the global tracking URI; it sets
and restores it under a lock.

Failure policy:
- `start_or_resume_run` fails fast with `TrackingUnavailableError` naming the URI, so a job with
  a wrong URI or a server that is down never starts training.
- `log_metrics` never raises: after retries with backoff it warns, counts the dropped batch in
  `failure_counts()` and skips metrics for a cool-down, so an unavailable server neither kills
  nor stalls a training job.
- `finish_run` never raises either: it often runs while another exception is propagating.
- Artifacts, params and models retry, then raise; callers that must not fail catch it.

MLflow is imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import posixpath
import re
import shlex
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from torch import nn

T = TypeVar("T")

# MLflow 3.17 limits (mlflow.utils.validation): log_batch takes at most 100 params/tags and
# 1000 metrics per call, a param value at most 6000 characters, a tag value 8000, a key 250.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

DEFAULT_UI_PORT = 5000
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# Characters MLflow accepts in param, metric and tag names on POSIX (Windows also forbids ":").
# "/" is allowed and kept: the UI groups charts by the prefix before it ("train/", "bbox/").
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")

# Why log calls were dropped or altered, for callers that want to report it (see module doc).
_failures: Counter[str] = Counter()
_failures_lock = threading.Lock()

# Stores that failed to take metrics, and until when (time.monotonic) not to try them again.
OFFLINE_COOLDOWN_S = 120.0
_offline_until: dict[str, float] = {}

# `mlflow.pytorch.log_model` reads MLflow's process-global tracking URI: serialise its callers.
_global_uri_lock = threading.Lock()


class TrackingUnavailableError(ValueError):
    """The tracking URI cannot be used. A `ValueError` so the `panet` commands report it as a
    configuration error with its message (which names the URI) instead of a traceback."""


# ---------------------------------------------------------------------------------------------
# Where runs go


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


def _sqlite_path(tracking_uri: str) -> Path | None:
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
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").as_uri()


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    # Passing registry_uri too keeps model registration on the same store as the runs, whatever
    # MLFLOW_REGISTRY_URI or a previous mlflow.set_registry_uri in this process says.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# ---------------------------------------------------------------------------------------------
# Retries


def _is_client_error(err: BaseException) -> bool:
    """A request MLflow rejected (bad value, missing run): retrying cannot help."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        try:
            return 400 <= err.get_http_status_code() < 500
        except Exception:
            return False
    return isinstance(err, (TypeError, ValueError))


def _retry(fn: Callable[[], T], what: str, attempts: int = 3, base_delay: float = 1.0) -> T:
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
            if _is_client_error(err) or attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt
            warnings.warn(
                f"MLflow {what} failed ({type(err).__name__}: {_short(err)}); "
                f"retrying in {delay:.0f} s",
                RuntimeWarning,
                stacklevel=3,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(reason: str, n: int = 1) -> None:
    with _failures_lock:
        _failures[reason] += n


def failure_counts() -> dict[str, int]:
    """Log calls dropped or altered in this process since start, by reason.

    Returns:
        e.g. {"metric_batches_dropped": 2, "metric_values_skipped": 1, "params_changed": 3}.
    """
    with _failures_lock:
        return dict(_failures)


# ---------------------------------------------------------------------------------------------
# Runs


def _check_reachable(tracking_uri: str, timeout: float = 5.0, attempts: int = 3) -> None:
    """Fail fast on an HTTP server that does not answer, rather than after MLflow's ~4 min of
    retries. Any HTTP answer counts as reachable (a proxy may not route /health)."""
    if not _is_http(tracking_uri):
        return
    url = tracking_uri.rstrip("/") + "/health"
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            last = err
            if attempt < attempts - 1:
                time.sleep(1.0 * 2**attempt)
    raise TrackingUnavailableError(
        f"MLflow tracking server {tracking_uri!r} is not reachable ({last}); start it, or unset "
        "MLFLOW_TRACKING_URI / tracking.uri to log to a local SQLite store"
    )


def _get_or_create_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=default_artifact_location(tracking_uri)
            )
        except MlflowException as err:
            # Another process (a parallel Tune trial) created it between our two calls.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise err from None
    if experiment.lifecycle_stage == "deleted":
        # A deleted experiment still owns its name: creating another of that name fails.
        warnings.warn(
            f"MLflow experiment {name!r} was deleted; restoring it", RuntimeWarning, stacklevel=3
        )
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _existing_run(client: MlflowClient, run_id: str) -> Any | None:
    """The run with this id, or None if the store has no live run of that id."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        # Unknown id, or not an id at all; anything else (down, forbidden) is not "missing".
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run


def start_or_resume_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Open the job's MLflow run: resume `run_id` if the store has it, else create one.

    A resumed job passes the run id its checkpoint stored, so it logs into the same run
    instead of creating a duplicate; the run is set back to RUNNING. A run id the store does
    not know (another store, or the run was deleted) gives a new run with a warning.

    Args:
        tracking_uri: from `resolve_tracking_uri`. A local SQLite file's folder is created.
        experiment_name: created if missing (local SQLite: artifacts in `<db dir>/mlartifacts`).
        run_name: the run's display name.
        run_id: the run to resume, or None.
        tags: set on the run (values become strings).

    Returns:
        The run id.

    Raises:
        TrackingUnavailableError: naming the URI, if the store cannot be reached or used.
    """
    from mlflow.exceptions import MlflowException

    db = _sqlite_path(tracking_uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingUnavailableError(
                f"MLflow tracking URI {tracking_uri!r} is unusable: cannot create {db.parent}: "
                f"{err.strerror}"
            ) from err
    _check_reachable(tracking_uri)
    str_tags = {
        _sanitize_name(str(k)): _clip(str(v), MAX_TAG_VALUE_LENGTH) for k, v in (tags or {}).items()
    }
    try:
        client = _client(tracking_uri)
        if run_id:
            run = _existing_run(client, run_id)
            if run is not None:
                if run.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                for key, value in str_tags.items():
                    client.set_tag(run_id, key, value)
                return run_id
            warnings.warn(
                f"MLflow run {run_id} is not in {tracking_uri!r} (or was deleted); "
                "starting a new run",
                RuntimeWarning,
                stacklevel=2,
            )
            str_tags["resumed_from_missing_run"] = run_id
        experiment_id = _get_or_create_experiment(client, tracking_uri, experiment_name)
        run = client.create_run(experiment_id, run_name=run_name, tags=str_tags)
        return run.info.run_id
    except MlflowException as err:
        raise TrackingUnavailableError(
            f"cannot open an MLflow run in {tracking_uri!r} "
            f"(experiment {experiment_name!r}): {_short(err)}"
        ) from err
    except Exception as err:
        # SQLAlchemy / OS errors: a path that cannot be written, a database of another app.
        raise TrackingUnavailableError(
            f"MLflow tracking URI {tracking_uri!r} is unusable: {type(err).__name__}: {_short(err)}"
        ) from err


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended. Never raises (it often runs while an exception propagates).

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        status: "FINISHED", "FAILED" or "KILLED".
    """
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    try:
        _retry(
            lambda: _client(tracking_uri).set_terminated(run_id, status),
            "set_terminated",
            attempts=_own_attempts(tracking_uri),
        )
    except Exception as err:
        _count("finish_failed")
        warnings.warn(
            f"could not mark MLflow run {run_id} {status} in {tracking_uri!r}: {_short(err)}",
            RuntimeWarning,
            stacklevel=2,
        )


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a run (values become strings, clipped to MLflow's limit); retries, raises.

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        tags: {name: value}.
    """
    from mlflow.entities import RunTag

    items = [
        RunTag(_sanitize_name(str(k)), _clip(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()
    ]
    client = _client(tracking_uri)
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        chunk = items[start : start + MAX_PARAMS_PER_BATCH]
        _retry(partial(client.log_batch, run_id, tags=chunk), "log_batch(tags)")


def delete_tags(tracking_uri: str, run_id: str, keys: list[str]) -> None:
    """Remove tags from a run (the ones it does not have are skipped); retries, raises."""
    client = _client(tracking_uri)
    present = _retry(lambda: client.get_run(run_id).data.tags, "get_run")
    for key in keys:
        if key in present:
            _retry(partial(client.delete_tag, run_id, key), "delete_tag")


def source_tags(entry_point: str, git_commit: str) -> dict[str, str]:
    """MLflow's system tags that fill a run page's "Source" and "Git commit" fields.

    Args:
        entry_point: what started the run, e.g. "panet train".
        git_commit: the repository's commit ("unknown" leaves the commit tag out).
    """
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "JOB"}
    if git_commit and git_commit != "unknown":
        tags["mlflow.source.git.commit"] = git_commit
    return tags


def log_dataset_inputs(tracking_uri: str, run_id: str, datasets: list[dict[str, Any]]) -> None:
    """Record the run's data as MLflow dataset inputs (the run page's "Datasets" field).

    Logging the same dataset again (a resumed run) is a no-op in MLflow: same name and digest.

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        datasets: one dict a split: `name`, `source` (a URI), `digest` (the shard manifest's
            fingerprint), `context` ("training" / "validation"), `rows`.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for d in datasets:
        profile = json.dumps({"num_rows": int(d["rows"])})
        dataset = Dataset(
            name=str(d["name"]),
            digest=str(d["digest"])[:36] or "unknown",  # MLflow's digest column holds 36
            source_type="local" if str(d["source"]).startswith("file:") else "external",
            source=json.dumps({"uri": str(d["source"])}),
            profile=profile,
        )
        tags = [InputTag("mlflow.data.context", str(d["context"]))]
        inputs.append(DatasetInput(dataset, tags))
    client = _client(tracking_uri)
    _retry(lambda: client.log_inputs(run_id, datasets=inputs), "log_inputs")


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    """The runs nested under `parent_run_id` (tag `mlflow.parentRunId`), oldest first."""
    client = _client(tracking_uri)
    parent = _retry(lambda: client.get_run(parent_run_id), "get_run")
    return list(
        _retry(
            lambda: client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                max_results=5000,
                order_by=["attributes.start_time ASC"],
            ),
            "search_runs",
        )
    )


# ---------------------------------------------------------------------------------------------
# Params and metrics


def _sanitize_name(name: str) -> str:
    """A param/metric/tag name MLflow accepts: other characters become "_", and the name must
    not change under path normalisation (MLflow may store it as a file path)."""
    name = _BAD_NAME_CHARS.sub("_", name.strip())
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    name = "/".join(parts) or "_"
    return name[:MAX_KEY_LENGTH]


def _clip(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    _count("values_truncated")
    return value[: limit - 3] + "..."


def _param_value(value: Any) -> str:
    """Strings as they are, lists/tuples/dicts as JSON, everything else through str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, sort_keys=isinstance(value, dict))
    return str(value)


def log_params(tracking_uri: str, run_id: str, flat_params: Mapping[str, Any]) -> dict[str, str]:
    """Log flat params, idempotently: safe to call again when a job resumes.

    MLflow params are immutable. Keys the run already has are skipped; if the new value
    differs (a resumed job run with an override), it goes to the tag `param_changed.<key>`
    with a warning instead of failing the job. Values longer than 6000 characters are
    clipped (the full config is logged as an artifact).

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        flat_params: {"dotted.key": value}; lists, tuples and dicts become JSON.

    Returns:
        {key: new value} of the params whose logged value differs.
    """
    from mlflow.entities import Param, RunTag

    client = _client(tracking_uri)
    wanted: dict[str, str] = {}
    for key, value in flat_params.items():
        wanted[_sanitize_name(str(key))] = _clip(_param_value(value), MAX_PARAM_VALUE_LENGTH)
    existing = _retry(lambda: client.get_run(run_id).data.params, "get_run")
    new = [Param(k, v) for k, v in wanted.items() if k not in existing]
    changed = {k: v for k, v in wanted.items() if k in existing and existing[k] != v}
    changed_tags = [
        RunTag(_sanitize_name(f"param_changed.{k}"), _clip(v, MAX_TAG_VALUE_LENGTH))
        for k, v in changed.items()
    ]
    if changed:
        _count("params_changed", len(changed))
        warnings.warn(
            f"params already logged with other values (kept, new values in "
            f"param_changed.* tags): {sorted(changed)}",
            RuntimeWarning,
            stacklevel=2,
        )
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        params = new[start : start + MAX_PARAMS_PER_BATCH]
        _retry(partial(client.log_batch, run_id, params=params), "log_batch(params)")
    for start in range(0, len(changed_tags), MAX_PARAMS_PER_BATCH):
        tags = changed_tags[start : start + MAX_PARAMS_PER_BATCH]
        _retry(partial(client.log_batch, run_id, tags=tags), "log_batch(tags)")
    return changed


def _metric_value(value: Any) -> float | None:
    """A float for numbers, 0-d tensors and numpy scalars; None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (ValueError, RuntimeError):
            return None
        return float(out) if isinstance(out, numbers.Real) else None
    return None


def _is_http(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def _own_attempts(tracking_uri: str) -> int:
    """Our tries per call. An HTTP store gets one: MLflow's HTTP session already retries
    connection errors and 5xx answers with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7,
    about 4 minutes in all), and retrying that again would stall a training step for 12."""
    return 1 if _is_http(tracking_uri) else 3


def log_metrics(
    tracking_uri: str,
    run_id: str,
    metrics: Mapping[str, Any],
    step: int,
    *,
    attempts: int | None = None,
    base_delay: float = 1.0,
    offline_cooldown: float = OFFLINE_COOLDOWN_S,
) -> int:
    """Log metrics at a step, in batches of 1000. Never raises.

    Names are sanitised to MLflow's characters (`bbox/AP` stays: "/" groups charts in the UI).
    NaN is stored as NaN; +-inf is stored by MLflow's SQL stores as +-1.8e308. Values that are
    not numbers are skipped and counted.

    A batch that still fails after its retries is dropped with a warning and counted in
    `failure_counts()`; the store is then taken as offline for `offline_cooldown` seconds, in
    which batches are dropped at once (counted) instead of stalling every training step on
    retries; the first call after that tries again.

    Args:
        tracking_uri: the run's store.
        run_id: the run.
        metrics: {name: number, 0-d tensor or numpy scalar}.
        step: the global training step.
        attempts: our tries per batch, doubling `base_delay` between them; default 1 for an
            HTTP server (MLflow's HTTP client retries with backoff itself), 3 otherwise (for
            SQLite's "database is locked").
        base_delay: seconds before our first retry.
        offline_cooldown: seconds to skip logging after a dropped batch.

    Returns:
        The number of metric values logged.
    """
    from mlflow.entities import Metric

    with _failures_lock:
        offline = time.monotonic() < _offline_until.get(tracking_uri, 0.0)
    if offline:
        _count("metric_batches_skipped_offline")
        return 0
    timestamp = int(time.time() * 1000)
    batch: dict[str, Metric] = {}
    for name, raw in metrics.items():
        value = _metric_value(raw)
        if value is None:
            _count("metric_values_skipped")
            warnings.warn(f"metric {name!r} is not a number: {raw!r}", RuntimeWarning, stacklevel=2)
            continue
        if not math.isfinite(value):
            _count("metric_values_nonfinite")
        key = _sanitize_name(str(name))
        batch[key] = Metric(key, value, timestamp, int(step))
    entries = list(batch.values())
    logged = 0
    try:
        client = _client(tracking_uri)
    except Exception as err:  # an unknown URI scheme: MLflow checks it here
        _count("metric_batches_dropped")
        warnings.warn(f"MLflow client for {tracking_uri!r}: {_short(err)}", RuntimeWarning, 2)
        return 0
    for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
        chunk = entries[start : start + MAX_METRICS_PER_BATCH]
        try:
            _retry(
                partial(client.log_batch, run_id, metrics=chunk),
                "log_batch(metrics)",
                attempts=attempts or _own_attempts(tracking_uri),
                base_delay=base_delay,
            )
            logged += len(chunk)
        except Exception as err:
            _count("metric_batches_dropped")
            unreachable = not _is_client_error(err)
            if unreachable:
                with _failures_lock:
                    _offline_until[tracking_uri] = time.monotonic() + offline_cooldown
            warnings.warn(
                f"dropped {len(chunk)} metrics at step {step} for run {run_id} "
                f"({tracking_uri!r}): {type(err).__name__}: {_short(err)}"
                + (f"; not logging metrics for {offline_cooldown:.0f} s" if unreachable else ""),
                RuntimeWarning,
                stacklevel=2,
            )
            if unreachable:
                break
    return logged


# ---------------------------------------------------------------------------------------------
# Artifacts


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
    client = _client(tracking_uri)
    if path.is_dir():
        _retry(lambda: client.log_artifacts(run_id, str(path), artifact_path), "log_artifacts")
    else:
        _retry(lambda: client.log_artifact(run_id, str(path), artifact_path), "log_artifact")
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


# ---------------------------------------------------------------------------------------------
# Models


@contextmanager
def _global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking and registry URIs at `tracking_uri` for a block.

    `mlflow.set_tracking_uri(None)` would also delete the MLFLOW_TRACKING_URI environment
    variable, so the previous module globals and environment are saved and put back exactly.
    """
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
    from importlib import metadata

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
    which cannot trace a detector taking a list of images of varying size. The model is moved
    to the CPU and eval mode for saving (so it loads on a machine without a GPU), then put back.
    In MLflow 3 the model is a LoggedModel of the run's experiment, linked to the run and to the
    run's metrics at `step`.

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
    import torch

    client = _client(tracking_uri)
    run = _retry(lambda: client.get_run(run_id), "get_run")
    # Created here, in the run's experiment: left to MLflow, a LoggedModel goes to the
    # process's active experiment, which is the Default experiment "0" in a Ray worker.
    logged = _retry(
        lambda: client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params=dict(run.data.params),
        ),
        "create_logged_model",
    )
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.cpu().eval()
    try:
        with _global_tracking_uri(tracking_uri):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                run_id=run_id,
                model_id=logged.model_id,
                step=step,
                serialization_format="pickle",
                pip_requirements=pip_requirements or model_pip_requirements(),
                code_paths=code_paths,
                registered_model_name=registered_model_name,
                await_registration_for=0,
                metadata=dict(metadata) if metadata else None,
            )
    finally:
        model.to(device).train(was_training)
    return str(info.model_uri)


def load_model(tracking_uri: str, model_uri: str, map_location: str = "cpu") -> nn.Module:
    """Load a model logged by `log_model` (MLflow resolves `models:/` and `runs:/` URIs through
    the global tracking URI, which this scopes to `tracking_uri`).

    Args:
        tracking_uri: the store the model was logged to.
        model_uri: `models:/<model_id>` as `log_model` returned it, or `runs:/<run_id>/<name>`.
        map_location: torch device for the weights.

    Returns:
        The module, in eval mode.
    """
    import mlflow.pytorch

    with _global_tracking_uri(tracking_uri):
        model = mlflow.pytorch.load_model(model_uri, map_location=map_location)
    return model.eval()


def model_metadata(tracking_uri: str, model_uri: str) -> dict[str, Any]:
    """The `metadata` a model was logged with (`log_model`); {} if none.

    Args:
        tracking_uri: the store the model was logged to.
        model_uri: `models:/...`, `runs:/...` or a local model directory.
    """
    import mlflow.models

    with _global_tracking_uri(tracking_uri):
        info = mlflow.models.get_model_info(model_uri)
    return dict(info.metadata or {})


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


# ---------------------------------------------------------------------------------------------
# The UI


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
            experiment_id = _client(tracking_uri).get_run(run_id).info.experiment_id
        except Exception:
            return f"{base}/#/runs/{run_id}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_runs_url(
    tracking_uri: str, experiment_id: str, *, ui_base: str | None = None
) -> str:
    """The URL of an experiment's "Training runs" table (a Tune sweep's trials side by side).

    `<base>/#/experiments/<id>` alone opens MLflow 3.17's GenAI overview (traces, which these
    runs do not have); `/runs` after it is the table of runs.

    Args:
        tracking_uri: the store; an http(s) server URI is also the UI's base URL.
        experiment_id: the experiment.
        ui_base: the UI's base URL, as in `run_page_url`.

    Returns:
        The URL.
    """
    base = (ui_base or _ui_base(tracking_uri)).rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs"


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
