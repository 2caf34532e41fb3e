"""MLflow: where runs go (store), one run per job (runs), artifacts, models and the champion;
pictures and samples.

Callers use the package, `from pipeline import tracking`, then `tracking.log_metrics(...)`: the
names below are its public interface, whichever module holds them. Importing it is cheap (MLflow
is imported inside the functions); `pictures` and `samples` (matplotlib, torch) are imported by
name where they are needed.
"""

from pipeline.tracking.artifacts import log_artifact_file, log_dict, log_figure, log_image
from pipeline.tracking.champion import CHAMPION, Promotion, promote_champion
from pipeline.tracking.metrics import MAX_PARAM_VALUE_LENGTH, log_metrics, log_params
from pipeline.tracking.models import (
    WEIGHTS_PATH,
    load_pickled_model,
    load_weights,
    log_model,
    model_metadata,
    model_pip_requirements,
    register_model,
)
from pipeline.tracking.outbox import Settings as OutboxSettings
from pipeline.tracking.outbox import close_outbox, open_outbox
from pipeline.tracking.runs import (
    child_runs,
    delete_tags,
    finish_run,
    git_commit,
    log_dataset_inputs,
    open_run,
    set_tags,
    start_or_resume_run,
)
from pipeline.tracking.store import (
    TrackingUnavailableError,
    default_artifact_location,
    resolve_tracking_uri,
    run_page_url,
    script_command,
    ui_command,
)

__all__ = [
    "CHAMPION",
    "MAX_PARAM_VALUE_LENGTH",
    "OutboxSettings",
    "Promotion",
    "WEIGHTS_PATH",
    "TrackingUnavailableError",
    "child_runs",
    "close_outbox",
    "default_artifact_location",
    "delete_tags",
    "finish_run",
    "git_commit",
    "load_pickled_model",
    "load_weights",
    "log_artifact_file",
    "log_dataset_inputs",
    "log_dict",
    "log_figure",
    "log_image",
    "log_metrics",
    "log_model",
    "log_params",
    "model_metadata",
    "model_pip_requirements",
    "open_outbox",
    "open_run",
    "promote_champion",
    "register_model",
    "resolve_tracking_uri",
    "run_page_url",
    "script_command",
    "set_tags",
    "start_or_resume_run",
    "ui_command",
]
