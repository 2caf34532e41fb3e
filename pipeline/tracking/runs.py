"""One MLflow run per job or sweep: open or resume it, tags, datasets, children, finish.

Failure policy:
- `open_run` and `start_or_resume_run` fail fast with `TrackingUnavailableError` naming the URI,
  so a job with a wrong URI or a server that is down never starts training.
- `finish_run` never raises: it often runs while another exception is propagating.
- Tags retry, then raise; callers that must not fail catch it.
- With an `outbox.Outbox` open for the run, `set_tags` and `finish_run` hand their record to its
  journal and return; the sender delivers it (`outbox.py`).
Params and metrics: `metrics.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking import journal
from pipeline.tracking.store import (
    TrackingUnavailableError,
    default_artifact_location,
    is_http,
    mlflow_client,
    own_attempts,
    retry,
    short_error,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow 3.17 limits (mlflow.utils.validation): log_batch takes at most 100 params/tags per
# call, a tag value at most 8000 characters, a key 250.
MAX_PARAMS_PER_BATCH = 100
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# Characters MLflow accepts in param, metric and tag names on POSIX (Windows also forbids ":").
# "/" is allowed and kept: the UI groups charts by the prefix before it ("train/", "bbox/").
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


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
    # deferred: `panet --help` imports this module (via submit); mlflow only when used
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


def _make_sqlite_folder(tracking_uri: str) -> None:
    """Create a local SQLite store's folder (MLflow does not); other stores are left alone."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingUnavailableError(
                f"MLflow tracking URI {tracking_uri!r} is unusable: cannot create {db.parent}: "
                f"{err.strerror}"
            ) from err


def _resumed(client: Any, run_id: str, tags: Mapping[str, str]) -> bool:
    """Set the run back to RUNNING with `tags`, if the store has it (not deleted)."""
    run = _existing_run(client, run_id)
    if run is None:
        return False
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return True


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

    _make_sqlite_folder(tracking_uri)
    _check_reachable(tracking_uri)
    str_tags = {
        mlflow_name(str(k)): clip(str(v), MAX_TAG_VALUE_LENGTH) for k, v in (tags or {}).items()
    }
    try:
        client = mlflow_client(tracking_uri)
        if run_id:
            if _resumed(client, run_id, str_tags):
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


def open_run(
    record: Any,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, Any],
    entry_point: str,
    commit: str,
) -> str:
    """The MLflow run of a job or a sweep: created once, then resumed by every re-run.

    `record` keeps the run's id and store, so a re-run logs into the same run and never makes a
    duplicate; a record of another store is not followed (the run is opened anew there).

    Args:
        record: the JSON file in the job's or sweep's directory (a Path, or a StoragePath).
        tracking_uri: from `resolve_tracking_uri`.
        experiment: the experiment's name. run_name: the run's display name.
        tags: set on the run, with the source tags of `entry_point` and `commit`.
        entry_point: the run's "Source" in the UI, e.g. "panet train".
        commit: from `git_commit`.

    Returns:
        The run id.
    """
    saved = json.loads(record.read_text()) if record.is_file() else {}
    run_id = saved.get("run_id") if saved.get("tracking_uri") == tracking_uri else None
    run_tags = {**tags, **source_tags(entry_point, commit)}
    run_id = start_or_resume_run(tracking_uri, experiment, run_name, run_id, run_tags)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    return run_id


def git_commit() -> str:
    """The commit of the checkout this code runs from ("unknown": an installed copy, no git)."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


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
        if journal.put(tracking_uri, run_id, "terminate", status=status):
            return
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

    named = {mlflow_name(str(k)): clip(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}
    if journal.put(tracking_uri, run_id, "tags", tags=named):
        return
    items = [RunTag(k, v) for k, v in named.items()]
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


def mlflow_name(name: str) -> str:
    """A param/metric/tag name MLflow accepts: other characters become "_", and the name must
    not change under path normalisation (MLflow may store it as a file path)."""
    name = _BAD_NAME_CHARS.sub("_", name.strip())
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    name = "/".join(parts) or "_"
    return name[:MAX_KEY_LENGTH]


def clip(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, "..." marking the cut."""
    if len(value) <= limit:
        return value
    return value[: limit - 3] + "..."
