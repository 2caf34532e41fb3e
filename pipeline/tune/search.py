"""Optuna's TPE as a sweep's search algorithm (`search: {algorithm: optuna}`).

Ray Tune's `OptunaSearch` asks Optuna's study for each new trial's values and tells it each
trial's last reported metric. The study lives beside the sweep's results, named after the
sweep, in Optuna's journal file storage (`<sweep dir>/optuna.journal`; an SQLite study took
~0.5 s a trial on a busy 2-core host, the journal ~40 ms):
`optuna.load_study(study_name=<sweep>, storage=JournalStorage(JournalFileBackend(<file>)))`
reads it and `optuna-dashboard <file>` shows it. Tune saves the searcher with the experiment, so
a restored sweep goes on asking the same study; an interrupted trial resumes with its values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.search.optuna import OptunaSearch

from pipeline.tune.sweep import Sweep, Trial, optuna_name

STUDY_FILE = "optuna.journal"  # in the sweep directory
PROBE = "optuna-probe"  # a probe's job name: no trial's directory, so no resume check meets one
MAX_RANDOM_STARTS = 10  # Optuna's default number of random trials before TPE models the rest


class SweepOptunaSearch(OptunaSearch):
    """`OptunaSearch` whose configs carry the trial's name, `trial-<Optuna's trial number>`,
    under `trial`, as every sweep trial's config does."""

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        values = super().suggest(trial_id)
        if values is None:
            return None
        return {"trial": optuna_name(self._ot_trials[trial_id].number), **values}


def choice_label(value: Any) -> Any:
    """A choice as Optuna's categorical stores it: a scalar as is, a list as its JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def optuna_space(sweep: Sweep) -> dict[str, Any]:
    """{dotted.key: Optuna distribution}: choice -> categorical, (log)uniform -> float."""
    space: dict[str, Any] = {}
    for key, spec in sweep.search.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            space[key] = CategoricalDistribution([choice_label(v) for v in values])
        else:
            low, high = float(values[0]), float(values[1])
            space[key] = FloatDistribution(low, high, log=kind == "loguniform")
    return space


def optuna_searcher(sweep: Sweep, sweep_dir: Path) -> SweepOptunaSearch:
    """The sweep's searcher: TPE seeded by the sweep's `seed`, its study in `optuna.journal`.

    The first third of the trials (at most 10) are random draws that TPE then models; with
    concurrent trials, TPE's constant liar keeps running trials from being proposed twice.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    starts = min(MAX_RANDOM_STARTS, max(1, sweep.samples // 3))
    sampler = optuna.samplers.TPESampler(
        seed=sweep.seed, n_startup_trials=starts, constant_liar=True
    )
    return SweepOptunaSearch(
        space=optuna_space(sweep),
        metric=sweep.metric,
        mode=sweep.mode,
        sampler=sampler,
        study_name=sweep.name,
        storage=JournalStorage(JournalFileBackend(str(sweep_dir / STUDY_FILE))),
    )


def searched_trial(sweep: Sweep, name: str, drawn: dict[str, Any]) -> Trial:
    """An Optuna trial: the common set and the values it drew ({key: value or choice label}).

    Raises:
        ValueError: a key or a choice the sweep does not search (a study of another sweep).
    """
    overrides = dict(sweep.set)
    for key, label in drawn.items():
        spec = sweep.search.get(key)
        if spec is None:
            raise ValueError(f"sweep {sweep.name!r} trial {name!r}: {key!r} is not searched")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            match = [v for v in values if choice_label(v) == label]
            if not match:
                raise ValueError(
                    f"sweep {sweep.name!r} trial {name!r}: {key}={label!r} is not one of its "
                    f"choices {values}"
                )
            label = match[0]
        overrides[key] = label
    return Trial(name, overrides)


def probes(sweep: Sweep) -> list[tuple[str, Any, Trial]]:
    """For an Optuna sweep, (key, value, trial) for each choice and each end of each range, so
    that a bad searched value fails before the sweep starts; none for the other algorithms."""
    if sweep.algorithm != "optuna":
        return []
    return [
        (key, value, Trial(PROBE, {**sweep.set, key: value}))
        for key, spec in sweep.search.items()
        for value in next(iter(spec.values()))
    ]
