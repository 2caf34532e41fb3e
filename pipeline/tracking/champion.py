"""The champion: a registered model's best version, by the metric its sweeps rank trials by.

At the end of a sweep its best trial's final model is registered under the sweep's name with
the alias `champion` if it beats the current champion (or there is none). A champion version
carries the metric it won with in its tags (`METRIC_TAG`, `VALUE_TAG`, `MODE_TAG`), so a later
sweep compares with that value: higher wins under mode max, lower under min, a tie keeps the
champion. A model that does not win is not registered; it stays on its run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipeline.tracking.models import register_model
from pipeline.tracking.store import mlflow_client, retry

CHAMPION = "champion"  # the alias: load the model as models:/<name>@champion
METRIC_TAG = "panet.metric"  # the metric the version won with, e.g. segm_AP
VALUE_TAG = "panet.metric_value"  # its value, as repr(float)
MODE_TAG = "panet.mode"  # max or min


@dataclass(frozen=True)
class Promotion:
    """What became of a candidate model.

    `outcome` is "registered" (it is the champion now), "kept" (the champion stays), "skipped"
    (no model to register) or "failed" (the registry refused; `message` says why).
    """

    outcome: str
    message: str
    version: str = ""  # the champion's version after the promotion, "" if none


def promote_champion(
    tracking_uri: str, name: str, run_id: str, metric: str, mode: str, value: float
) -> Promotion:
    """Register a run's final model as `name`'s champion if it beats the current champion.

    Args:
        tracking_uri: the store of the run and of the registry (SQLite or a server).
        name: the registered model, e.g. the sweep's name.
        run_id: the run that logged the model (`log_model`, at the end of training).
        metric: the name of the metric `value` is, e.g. "segm_AP".
        mode: "max" (higher is better) or "min".
        value: the candidate's metric.

    Returns:
        The outcome, with a one-line `message` for the user. Registry errors are reported in
        it ("failed"), not raised: the sweep's results stand without a champion.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r}: expected 'max' or 'min'")
    try:
        return _promote(tracking_uri, name, run_id, metric, mode, value)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; reported, not raised
        return Promotion("failed", f"could not promote the model of run {run_id}: {err}")


def _promote(
    tracking_uri: str, name: str, run_id: str, metric: str, mode: str, value: float
) -> Promotion:
    client = mlflow_client(tracking_uri)
    model_id = _final_model(client, run_id)
    if model_id is None:
        return Promotion(
            "skipped",
            f"run {run_id} logged no model (tracking.log_model off, or it stopped early): "
            f"nothing registered as {name}@{CHAMPION}",
        )
    current = _champion(client, name)
    if current is not None:
        why = _why_kept(current, run_id, metric, mode, value)
        if why:
            held = str(current.version)
            return Promotion("kept", f"kept v{held} as {name}@{CHAMPION} ({why})", held)
    version = register_model(tracking_uri, f"models:/{model_id}", name)
    tags = {METRIC_TAG: metric, VALUE_TAG: repr(float(value)), MODE_TAG: mode}
    for key, tag in tags.items():
        retry(partial(client.set_model_version_tag, name, version, key, tag), "set_tag")
    retry(partial(client.set_registered_model_alias, name, CHAMPION, version), "set_alias")
    was = "" if current is None else f", replacing v{current.version}"
    return Promotion(
        "registered",
        f"registered v{version} as {name}@{CHAMPION} ({metric} {value:.4f}{was})",
        version,
    )


def _why_kept(current: Any, run_id: str, metric: str, mode: str, value: float) -> str:
    """Why the champion `current` stays against a candidate, "" if the candidate wins."""
    if current.run_id == run_id:
        return "it is this model"
    tags = current.tags or {}
    if tags.get(METRIC_TAG) != metric or tags.get(MODE_TAG) != mode:
        return (
            f"it won by {tags.get(METRIC_TAG, 'no recorded metric')} "
            f"({tags.get(MODE_TAG, '?')}), not comparable with {metric} ({mode}); "
            "register this model under another name"
        )
    try:
        held = float(tags[VALUE_TAG])
    except (KeyError, ValueError):
        return f"its tag {VALUE_TAG} is missing or not a number"
    if _beats(value, held, mode):
        return ""
    return f"{metric} {held:.4f}, not beaten by this model's {value:.4f}"


def _final_model(client: Any, run_id: str) -> str | None:
    """The id of the last LoggedModel the run output, None if it has none."""
    run = retry(lambda: client.get_run(run_id), "get_run")
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        return None
    return str(max(outputs, key=lambda o: o.step).model_id)


def _champion(client: Any, name: str) -> Any:
    """The champion version of `name`, None if the model or its alias does not exist."""
    # deferred: `panet --help` imports this package (via submit); mlflow only when used
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _beats(value: float, held: float, mode: str) -> bool:
    """Strictly better under `mode`. A NaN never wins; a NaN champion loses to any number."""
    if math.isnan(value):
        return False
    if math.isnan(held):
        return True
    return value > held if mode == "max" else value < held
