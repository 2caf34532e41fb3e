"""One MLflow run per job: open or resume it, tags, params, metrics, datasets, finish.

Failure policy:
- `start_or_resume_run` fails fast with `TrackingUnavailableError` naming the URI, so a job with
  a wrong URI or a server that is down never starts training.
- `log_metrics` never raises: after retries with backoff it warns, drops the batch and skips
  metrics for a cool-down, so an unavailable server neither kills nor stalls a training job.
- `finish_run` never raises either: it often runs while another exception is propagating.
- Tags and params retry, then raise; callers that must not fail catch it.
"""

from __future__ import annotations

import json
import numbers
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from pipeline.tracking.store import (
    TrackingUnavailableError,
    default_artifact_location,
    is_client_error,
    is_http,
    mlflow_client,
    own_attempts,
    retry,
    short_error,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow 3.17 limits (mlflow.utils.validation): log_batch takes at most 100 params/tags and
# 1000 metrics per call, a param value at most 6000 characters, a tag value 8000, a key 250.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# Characters MLflow accepts in param, metric and tag names on POSIX (Windows also forbids ":").
# "/" is allowed and kept: the UI groups charts by the prefix before it ("train/", "bbox/").
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")

# Stores that failed to take metrics, and until when (time.monotonic) not to try them again.
OFFLINE_COOLDOWN_S = 120.0
_offline_until: dict[str, float] = {}
_offline_lock = threading.Lock()


def _check_reachable(tracking_uri: str, timeout: float = 5.0, attempts: int = 3) -> None:
    """Fail fast on an HTTP server that does not answer, rather than after MLflow's ~4 min of
    retries. Any HTTP answer counts as reachable (a proxy may not route /health)."""
    if not is_http(tracking_uri):
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

    db = sqlite_path(tracking_uri)
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
        client = mlflow_client(tracking_uri)
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
            f"(experiment {experiment_name!r}): {short_error(err)}"
        ) from err
    except Exception as err:
        # SQLAlchemy / OS errors: a path that cannot be written, a database of another app.
        raise TrackingUnavailableError(
            f"MLflow tracking URI {tracking_uri!r} is unusable: {type(err).__name__}: {short_error(err)}"
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
        retry(
            lambda: mlflow_client(tracking_uri).set_terminated(run_id, status),
            "set_terminated",
            attempts=own_attempts(tracking_uri),
        )
    except Exception as err:
        warnings.warn(
            f"could not mark MLflow run {run_id} {status} in {tracking_uri!r}: {short_error(err)}",
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
    client = mlflow_client(tracking_uri)
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        chunk = items[start : start + MAX_PARAMS_PER_BATCH]
        retry(partial(client.log_batch, run_id, tags=chunk), "log_batch(tags)")


def delete_tags(tracking_uri: str, run_id: str, keys: list[str]) -> None:
    """Remove tags from a run (the ones it does not have are skipped); retries, raises."""
    client = mlflow_client(tracking_uri)
    present = retry(lambda: client.get_run(run_id).data.tags, "get_run")
    for key in keys:
        if key in present:
            retry(partial(client.delete_tag, run_id, key), "delete_tag")


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
    client = mlflow_client(tracking_uri)
    retry(lambda: client.log_inputs(run_id, datasets=inputs), "log_inputs")


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    """The runs nested under `parent_run_id` (tag `mlflow.parentRunId`), oldest first."""
    client = mlflow_client(tracking_uri)
    parent = retry(lambda: client.get_run(parent_run_id), "get_run")
    return list(
        retry(
            lambda: client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                max_results=5000,
                order_by=["attributes.start_time ASC"],
            ),
            "search_runs",
        )
    )


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

    client = mlflow_client(tracking_uri)
    wanted: dict[str, str] = {}
    for key, value in flat_params.items():
        wanted[_sanitize_name(str(key))] = _clip(_param_value(value), MAX_PARAM_VALUE_LENGTH)
    existing = retry(lambda: client.get_run(run_id).data.params, "get_run")
    new = [Param(k, v) for k, v in wanted.items() if k not in existing]
    changed = {k: v for k, v in wanted.items() if k in existing and existing[k] != v}
    changed_tags = [
        RunTag(_sanitize_name(f"param_changed.{k}"), _clip(v, MAX_TAG_VALUE_LENGTH))
        for k, v in changed.items()
    ]
    if changed:
        warnings.warn(
            f"params already logged with other values (kept, new values in "
            f"param_changed.* tags): {sorted(changed)}",
            RuntimeWarning,
            stacklevel=2,
        )
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        params = new[start : start + MAX_PARAMS_PER_BATCH]
        retry(partial(client.log_batch, run_id, params=params), "log_batch(params)")
    for start in range(0, len(changed_tags), MAX_PARAMS_PER_BATCH):
        tags = changed_tags[start : start + MAX_PARAMS_PER_BATCH]
        retry(partial(client.log_batch, run_id, tags=tags), "log_batch(tags)")
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
    not numbers are skipped with a warning.

    A batch that still fails after its retries is dropped with a warning; the store is then
    taken as offline for `offline_cooldown` seconds, in which batches are dropped at once instead
    of stalling every training step on retries; the first call after that tries again.

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

    with _offline_lock:
        offline = time.monotonic() < _offline_until.get(tracking_uri, 0.0)
    if offline:
        return 0
    timestamp = int(time.time() * 1000)
    batch: dict[str, Metric] = {}
    for name, raw in metrics.items():
        value = _metric_value(raw)
        if value is None:
            warnings.warn(f"metric {name!r} is not a number: {raw!r}", RuntimeWarning, stacklevel=2)
            continue
        key = _sanitize_name(str(name))
        batch[key] = Metric(key, value, timestamp, int(step))
    entries = list(batch.values())
    logged = 0
    try:
        client = mlflow_client(tracking_uri)
    except Exception as err:  # an unknown URI scheme: MLflow checks it here
        warnings.warn(f"MLflow client for {tracking_uri!r}: {short_error(err)}", RuntimeWarning, 2)
        return 0
    for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
        chunk = entries[start : start + MAX_METRICS_PER_BATCH]
        try:
            retry(
                partial(client.log_batch, run_id, metrics=chunk),
                "log_batch(metrics)",
                attempts=attempts or own_attempts(tracking_uri),
                base_delay=base_delay,
            )
            logged += len(chunk)
        except Exception as err:
            unreachable = not is_client_error(err)
            if unreachable:
                with _offline_lock:
                    _offline_until[tracking_uri] = time.monotonic() + offline_cooldown
            warnings.warn(
                f"dropped {len(chunk)} metrics at step {step} for run {run_id} "
                f"({tracking_uri!r}): {type(err).__name__}: {short_error(err)}"
                + (f"; not logging metrics for {offline_cooldown:.0f} s" if unreachable else ""),
                RuntimeWarning,
                stacklevel=2,
            )
            if unreachable:
                break
    return logged
