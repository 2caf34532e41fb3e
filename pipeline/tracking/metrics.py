"""Params and metrics of a run, under MLflow's names and limits.

Failure policy:
- With an `outbox.Outbox` open for the run, both hand their record to its journal and return
  (the sender delivers it; `outbox.py`). Otherwise:
- `log_params` retries, then raises; a resumed job's changed value goes to a tag, not an error.
- `log_metrics` never raises: after retries with backoff it warns, drops the batch and skips
  metrics for a cool-down, so an unavailable server neither kills nor stalls a training job.
"""

from __future__ import annotations

import json
import numbers
import threading
import time
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any

from pipeline.tracking import journal
from pipeline.tracking.runs import MAX_PARAMS_PER_BATCH, MAX_TAG_VALUE_LENGTH, clip, mlflow_name
from pipeline.tracking.store import is_client_error, mlflow_client, own_attempts, retry, short_error

# MLflow 3.17 limits (mlflow.utils.validation): log_batch takes at most 1000 metrics per call, a
# param value at most 6000 characters.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000

# Stores that failed to take metrics, and until when (time.monotonic) not to try them again.
OFFLINE_COOLDOWN_S = 120.0
_offline_until: dict[str, float] = {}
_offline_lock = threading.Lock()


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
        {key: new value} of the params whose logged value differs ({} when an outbox takes
        them: the sender compares them when it delivers them).
    """
    wanted: dict[str, str] = {}
    for key, value in flat_params.items():
        wanted[mlflow_name(str(key))] = clip(_param_value(value), MAX_PARAM_VALUE_LENGTH)
    if journal.put(tracking_uri, run_id, "params", params=wanted):
        return {}
    return deliver_params(tracking_uri, run_id, wanted)


def deliver_params(
    tracking_uri: str, run_id: str, wanted: dict[str, str], warn: bool = True
) -> dict[str, str]:
    """`log_params`'s delivery of names and values already in MLflow's form; `warn`: warn of
    changed values (an outbox's sender does not: the job has said so when it started)."""
    # deferred: `panet --help` imports this module (via submit); mlflow only when logging
    from mlflow.entities import Param, RunTag

    client = mlflow_client(tracking_uri)
    existing = retry(lambda: client.get_run(run_id).data.params, "get_run")
    new = [Param(k, v) for k, v in wanted.items() if k not in existing]
    changed = {k: v for k, v in wanted.items() if k in existing and existing[k] != v}
    changed_tags = [
        RunTag(mlflow_name(f"param_changed.{k}"), clip(v, MAX_TAG_VALUE_LENGTH))
        for k, v in changed.items()
    ]
    if changed and warn:
        warnings.warn(
            f"params already logged with other values (kept, new values in "
            f"param_changed.* tags): {sorted(changed)}",
            RuntimeWarning,
            stacklevel=3,
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

    Names are sanitised to MLflow's characters (`bbox/AP` stays: "/" groups charts in the UI);
    NaN is stored as NaN, +-inf as +-1.8e308 (SQL stores); a value that is not a number is
    skipped with a warning. With an outbox open for the run the values go to its journal. Else a
    batch that still fails after its retries is dropped with a warning and the store is taken as
    offline for `offline_cooldown` seconds (batches dropped at once: no step stalls on retries).

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
        The number of metric values logged (or handed to the run's outbox).
    """
    entries = _metric_entries(metrics, step)
    rows = [[m.key, m.value, m.timestamp, m.step] for m in entries]
    if rows and journal.put(tracking_uri, run_id, "metrics", metrics=rows):
        return len(rows)
    with _offline_lock:
        offline = time.monotonic() < _offline_until.get(tracking_uri, 0.0)
    if offline:
        return 0
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
            if _dropped(err, len(chunk), step, run_id, tracking_uri, offline_cooldown):
                break
    return logged


def _metric_entries(metrics: Mapping[str, Any], step: int) -> list[Any]:
    """MLflow `Metric`s under MLflow's names, one per name; a value that is not a number is
    skipped with a warning pointing at `log_metrics`'s caller."""
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    batch: dict[str, Metric] = {}
    for name, raw in metrics.items():
        value = _metric_value(raw)
        if value is None:
            warnings.warn(f"metric {name!r} is not a number: {raw!r}", RuntimeWarning, stacklevel=3)
            continue
        key = mlflow_name(str(name))
        batch[key] = Metric(key, value, timestamp, int(step))
    return list(batch.values())


def _dropped(
    err: Exception, count: int, step: int, run_id: str, tracking_uri: str, offline_cooldown: float
) -> bool:
    """Warn that a batch was dropped; an unreachable store (not a client error) is taken as
    offline for `offline_cooldown` seconds. Returns whether it is, so the rest is not tried."""
    unreachable = not is_client_error(err)
    if unreachable:
        with _offline_lock:
            _offline_until[tracking_uri] = time.monotonic() + offline_cooldown
    warnings.warn(
        f"dropped {count} metrics at step {step} for run {run_id} "
        f"({tracking_uri!r}): {type(err).__name__}: {short_error(err)}"
        + (f"; not logging metrics for {offline_cooldown:.0f} s" if unreachable else ""),
        RuntimeWarning,
        stacklevel=3,
    )
    return unreachable
