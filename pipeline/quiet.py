"""A run's console output kept to what the user needs.

Ray, Ray Data and MLflow print expected messages that look like problems: a token-auth
warning, `tqdm is not installed`, a deprecation warning raised by Ray's own ingest defaults,
an error-level line about the Ray Train preemption watcher's actor arguments, MLflow's pickle
caution for the model we log on purpose, and Ray Train's per-report line that shows every
rank's placeholder metrics (`segm_AP: -1.0` on ranks that did not evaluate); MLflow also
prints links of its own that lead elsewhere than ours. Each is switched off at its source, by
its exact message or setting, so real warnings and errors still show (the preemption watcher
in `pipeline.ray_session`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

from ray.util.annotations import RayDeprecationWarning

# (logger name, message prefix) of expected records dropped in the driver.
DRIVER_RECORDS = (
    ("ray.experimental.tqdm_ray", "tqdm is not installed"),
    # A new local instance gets token auth (kept on); only the notice that it did is dropped.
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),
)
# (logger name, message prefix) dropped in train and eval workers.
WORKER_RECORDS = (("mlflow.pytorch", "Saving pytorch model by Pickle"),)
# Ending a run on a tracking server, MLflow prints "View run ... at" and "View experiment at
# <server>/#/experiments/<id>", which opens MLflow 3.17's GenAI overview (no traces here); the
# driver prints the run's page and the runs table itself (`pipeline.tracking`).
SUPPRESS_MLFLOW_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
# Ray Train V2 names this logger by its file path; it logs every report of every rank at INFO.
TRAIN_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"
# Ray Train's own `DataConfig.default_ingest_options` sets the deprecated option it warns about.
RAY_DEPRECATION = r"`ExecutionOptions.exclude_resources` is deprecated"


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _drop(records: tuple[tuple[str, str], ...]) -> None:
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in records:
        by_logger[name] = (*by_logger.get(name, ()), prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


def quiet_driver() -> None:
    """Drop the driver's expected Ray messages (`DRIVER_RECORDS`, Ray's own deprecation), and
    MLflow's own links (`SUPPRESS_MLFLOW_LINKS`)."""
    _drop(DRIVER_RECORDS)
    os.environ.setdefault(SUPPRESS_MLFLOW_LINKS, "true")

    warnings.filterwarnings("ignore", message=RAY_DEPRECATION, category=RayDeprecationWarning)


def quiet_worker() -> None:
    """Ray's `worker_process_setup_hook` of train and eval workers (see `worker_env`)."""
    _drop(WORKER_RECORDS)
    spec = importlib.util.find_spec(TRAIN_REPORT_LOGGER_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
