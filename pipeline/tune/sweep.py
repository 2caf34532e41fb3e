"""Sweep files: YAML -> a validated `Sweep` -> the explicit list of trials, without Ray.

A sweep file holds the metric, the scheduler, the concurrency and the number of samples, and
the trials' overrides of the job config: `set` (every trial), `variants` (named rows, each with
its own `set` and the paper's numbers) and `search` (dotted key -> `{grid: [...]}`,
`{choice: [...]}`, `{uniform: [lo, hi]}` or `{loguniform: [lo, hi]}`). With the
default `search.algorithm: random` the trials are the variants x the grid's product x `samples`,
`choice`/`uniform`/`loguniform` drawn per trial from the sweep's seed, each run `seeds` times
(`seed` 0..N-1). The expansion happens here, once, so `--dry-run` prints exactly the trials that
run and a restored sweep re-expands the same ones. With `optuna`, the trials are `samples` slots
whose searched values Optuna picks as the sweep runs (`pipeline/tune/search.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from panet_model.config import flatten
from pipeline import safe_yaml
from pipeline.config import JobConfig, load_job_config, resolve_shipped

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform")
ALGORITHMS = ("random", "optuna")  # search.algorithm: drawn up front, or by Optuna's TPE
METRICS = ("segm_AP", "bbox_AP", "train_loss")  # reported to Tune after each evaluation
TOP_KEYS = {
    "name",
    "description",
    "config",
    "metric",
    "mode",
    "scheduler",
    "asha",
    "concurrency",
    "samples",
    "seeds",
    "seed",
    "max_failures",
    "set",
    "variants",
    "search",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Variant:
    """A named row of a sweep: its overrides and the paper's numbers for it, if any."""

    name: str
    set: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)  # e.g. {"segm_AP": 33.4}


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    name: str  # the sweep's name: its directory under <storage>/sweeps and its MLflow run
    path: str  # the file it was read from
    description: str = ""
    config: str = ""  # default job config: a shipped config's name or a path; --config wins
    metric: str = "segm_AP"  # reported metric Tune compares trials by
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: int = 0  # ASHA: steps before the first rung, 0 = eval.every_steps
    reduction_factor: int = 2  # ASHA: keep the best 1/rf of the trials at each rung
    concurrency: int = 0  # trials at a time, 0 = as many as the cluster holds
    samples: int = 1  # repeats of the whole expansion (new draws each time)
    seed: int = 0  # seed of the sampled values (and of Optuna's sampler)
    seeds: int = 1  # runs of every row, with the job's `seed` set to 0..seeds-1
    algorithm: Literal["random", "optuna"] = "random"  # search.algorithm
    max_failures: int = 1  # retries of a failed trial before it is marked failed
    set: dict[str, Any] = field(default_factory=dict)
    variants: tuple[Variant, ...] = ()
    search: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the sweep as logged to MLflow and kept in the sweep directory)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Trial:
    """One trial: its name, its overrides of the base job, the paper's numbers for its row."""

    name: str
    overrides: dict[str, Any]
    variant: str = ""
    paper: dict[str, float] = field(default_factory=dict)
    group: str = ""  # the row a repeated trial (seeds > 1) runs again; "" = its own name


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"sweep {where}: {message}")


def find_sweep(name_or_path: str) -> Path:
    """A sweep file: a path, or the name of a shipped one in jobs/sweeps/."""
    return resolve_shipped(name_or_path, "sweeps")


def load_sweep(name_or_path: str, name: str | None = None) -> Sweep:
    """Read and check a sweep file (structure and values; job keys are checked by `expand`).

    Args:
        name_or_path: a YAML file, or a shipped sweep's name.
        name: the sweep's name (default: the file's `name`, else its stem).

    Raises:
        ValueError: naming the file and the key that is wrong.
    """
    path = find_sweep(name_or_path)
    where = repr(str(path))
    data = _read_mapping(path, where)
    sweep_name = name or str(data.get("name") or path.stem)
    if not _NAME.match(sweep_name):
        raise _fail(where, f"name {sweep_name!r}: letters, digits and _.+- only")
    metric, mode, scheduler, asha = _objective(data, where)
    ints = _integers(data, asha, where)
    common = _overrides(data.get("set") or {}, f"{where} set")
    variants = tuple(_variant(v, i, where) for i, v in enumerate(data.get("variants") or []))
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            raise _fail(where, f"variants: name {v.name!r} appears twice")
        seen.add(v.name)
    algorithm, search = _search(data.get("search") or {}, where)
    _check_algorithm(algorithm, search, variants, ints["seeds"], where)
    _check_seeds(ints["seeds"], common, variants, search, where)
    config = data.get("config", "")
    if not isinstance(config, str):
        raise _fail(where, f"config {config!r}: expected a job config path")
    return Sweep(
        name=sweep_name,
        path=str(path.resolve()),
        description=str(data.get("description", "")).strip(),
        config=config,
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        grace_period=ints["asha.grace_period"],
        reduction_factor=ints["asha.reduction_factor"],
        concurrency=ints["concurrency"],
        samples=ints["samples"],
        seed=ints["seed"],
        seeds=ints["seeds"],
        algorithm=algorithm,
        max_failures=ints["max_failures"],
        set=common,
        variants=variants,
        search=search,
    )


def _read_mapping(path: Path, where: str) -> dict[str, Any]:
    """The file's top-level mapping, its keys checked against TOP_KEYS."""
    data = safe_yaml.load_file(path, "sweep file") or {}
    if not isinstance(data, dict):
        raise _fail(where, "expected a mapping at the top level")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (keys: {', '.join(sorted(TOP_KEYS))})")
    return data


def _objective(data: dict[str, Any], where: str) -> tuple[str, str, str, dict[str, Any]]:
    """(metric, mode, scheduler, asha settings), each checked; mode defaults by the metric."""
    metric = data.get("metric", "segm_AP")
    if metric not in METRICS:
        raise _fail(where, f"metric {metric!r}: expected one of {list(METRICS)}")
    mode = data.get("mode", "min" if metric == "train_loss" else "max")
    if mode not in ("max", "min"):
        raise _fail(where, f"mode {mode!r}: expected 'max' or 'min'")
    scheduler = data.get("scheduler", "fifo")
    if scheduler not in ("fifo", "asha"):
        raise _fail(where, f"scheduler {scheduler!r}: expected 'fifo' or 'asha'")
    asha = data.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor"}:
        raise _fail(where, "asha: expected {grace_period: steps, reduction_factor: n}")
    return metric, mode, scheduler, asha


def _integers(data: dict[str, Any], asha: dict[str, Any], where: str) -> dict[str, int]:
    """The sweep's integer settings under their keys, defaults filled, each >= its lowest."""
    ints = {
        "concurrency": (data.get("concurrency", 0), 0),
        "samples": (data.get("samples", 1), 1),
        "seeds": (data.get("seeds", 1), 1),
        "seed": (data.get("seed", 0), 0),
        "max_failures": (data.get("max_failures", 1), 0),
        "asha.grace_period": (asha.get("grace_period", 0), 0),
        "asha.reduction_factor": (asha.get("reduction_factor", 2), 2),
    }
    for key, (value, low) in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _fail(where, f"{key} {value!r}: expected an integer >= {low}")
    return {key: value for key, (value, _) in ints.items()}


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"sweep {where}: expected a mapping of dotted.key: value")

    flat = flatten(value)
    for key in flat:
        if key in ("model.preset", "name") or key.startswith(("checkpoint.storage_path",)):
            raise ValueError(
                f"sweep {where}: key {key!r} cannot vary in a sweep (set the model's keys; "
                "trial names and storage come from the sweep)"
            )
    return flat


def _variant(value: Any, i: int, where: str) -> Variant:
    if not isinstance(value, dict) or set(value) - {"name", "set", "paper"}:
        raise _fail(where, f"variants[{i}]: expected {{name, set, paper}}")
    name = value.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(where, f"variants[{i}].name {name!r}: letters, digits and _.+- only")
    paper = value.get("paper") or {}
    if not isinstance(paper, dict) or any(
        k not in ("segm_AP", "bbox_AP") or isinstance(v, bool) or not isinstance(v, (int, float))
        for k, v in paper.items()
    ):
        raise _fail(where, f"variants[{i}].paper: expected {{segm_AP: number, bbox_AP: number}}")
    sets = _overrides(value.get("set") or {}, f"{where} variants[{i}] ({name}) set")
    return Variant(name=name, set=sets, paper={k: float(v) for k, v in paper.items()})


def _search(value: Any, where: str) -> tuple[str, dict[str, dict[str, list[Any]]]]:
    """(search.algorithm, {dotted.key: {kind: values}}), each checked."""
    if not isinstance(value, dict):
        raise _fail(where, "search: expected a mapping of dotted.key: {kind: values}")
    algorithm = value.get("algorithm", "random")
    if algorithm not in ALGORITHMS:
        raise _fail(where, f"search.algorithm {algorithm!r}: expected one of {list(ALGORITHMS)}")
    out: dict[str, dict[str, list[Any]]] = {}
    for key, spec in value.items():
        if key == "algorithm":
            continue
        _overrides({key: 0}, f"{where} search")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise _fail(where, f"search {key!r}: expected one of {{{', '.join(SEARCH_KINDS)}}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise _fail(where, f"search {key!r}: {kind} needs a non-empty list")
        if kind in ("uniform", "loguniform"):
            ok = len(values) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            )
            if not ok or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
                raise _fail(where, f"search {key!r}: {kind} needs [low, high] with 0 < low < high")
        out[key] = {kind: list(values)}
    return algorithm, out


def _check_algorithm(
    algorithm: str, search: dict, variants: tuple[Variant, ...], seeds: int, where: str
) -> None:
    """Optuna searches one space: no rows to compare, no grid, something to draw."""
    grid = [k for k, spec in search.items() if "grid" in spec]
    problem = (
        (grid and f"search {grid[0]!r}: grid (use choice: Optuna draws every searched key)")
        or (variants and "variants: Optuna searches one space (compare rows with random)")
        or (seeds > 1 and f"seeds {seeds}: repeat rows with the random algorithm")
        or (not search and "no searched key: add choice, uniform or loguniform keys")
    )
    if algorithm == "optuna" and problem:
        raise _fail(where, f"{problem}; not with search.algorithm optuna")


def _check_seeds(
    seeds: int, common: dict, variants: tuple[Variant, ...], search: dict, where: str
) -> None:
    """`seeds: N` owns the job's `seed`: no row may set it too."""
    if seeds == 1:
        return
    owners = [("set", common), ("search", search)] + [
        (f"variants ({v.name}) set", v.set) for v in variants
    ]
    for label, keys in owners:
        if "seed" in keys:
            raise _fail(where, f"seeds {seeds} sets every trial's 'seed' (0..{seeds - 1}); "
                        f"remove the key 'seed' from {label}")  # fmt: skip


def expand(sweep: Sweep) -> list[Trial]:
    """The sweep's trials, in order: variants x grid product x samples, sampled values drawn,
    then every one again for each further seed; with Optuna, `samples` slots of the common set.

    Trial names are the variant's name when that alone is unique, else numbered; with seeds,
    `-s<seed>` follows. Optuna's slots are `trial-000`, ... (its trial numbers).
    """
    if sweep.algorithm == "optuna":
        return [Trial(optuna_name(i), dict(sweep.set)) for i in range(sweep.samples)]
    rng = random.Random(sweep.seed)
    variants = sweep.variants or (Variant(name=""),)
    grid_keys = [k for k, s in sweep.search.items() if "grid" in s]
    grids = list(itertools.product(*(sweep.search[k]["grid"] for k in grid_keys)))
    rows: list[tuple[Variant, dict[str, Any]]] = []
    for _ in range(sweep.samples):
        for variant in variants:
            for values in grids:
                overrides = {**sweep.set, **variant.set, **dict(zip(grid_keys, values))}
                for key, spec in sweep.search.items():
                    if "grid" not in spec:
                        overrides[key] = _draw(spec, rng)
                rows.append((variant, overrides))
    numbered = len(rows) > len(variants) or not sweep.variants
    trials = []
    for i, (variant, overrides) in enumerate(rows):
        name = variant.name if not numbered else "-".join(filter(None, [variant.name, f"{i:03d}"]))
        trials.append(Trial(name, overrides, variant.name, dict(variant.paper)))
    if sweep.seeds == 1:
        return trials
    # Seed-major: an interrupted sweep has every row once before any row twice.
    return [
        dataclasses.replace(
            t, name=f"{t.name}-s{k}", overrides={**t.overrides, "seed": k}, group=t.name
        )
        for k in range(sweep.seeds)
        for t in trials
    ]


def optuna_name(number: int) -> str:
    """The name of the trial Optuna numbers `number`."""
    return f"trial-{number:03d}"


def _draw(spec: dict[str, list[Any]], rng: random.Random) -> Any:
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return values[rng.randrange(len(values))]
    lo, hi = float(values[0]), float(values[1])
    if kind == "uniform":
        return rng.uniform(lo, hi)
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def trial_job(base: dict[str, Any], trial: Trial, sweep_dir: Path, tracking_uri: str) -> JobConfig:
    """A trial's job config: the base job (flat, absolute paths) + the trial's overrides.

    Its Ray Train run and job directory live in `<sweep dir>/trials/<trial name>`, and it logs
    to the sweep's shared tracking store.

    Raises:
        ValueError: naming the trial and the config key that is wrong.
    """
    fixed = {
        "name": trial.name,
        "checkpoint.storage_path": str(Path(sweep_dir) / "trials"),
        "tracking.uri": tracking_uri,
    }
    try:
        return load_job_config(None, {**base, **trial.overrides, **fixed})
    except ValueError as err:
        raise ValueError(f"sweep trial {trial.name!r}: {err}") from err


def base_job(config: str | Path | None, sets: dict[str, Any]) -> tuple[JobConfig, dict[str, Any]]:
    """The sweep's base job, and its flat dict (`model.preset` + every key, absolute paths)."""
    job = load_job_config(config, sets)
    return job, flatten(job.to_dict())


def check_trials(sweep: Sweep, trials: list[Trial], jobs: list[JobConfig]) -> None:
    """Checks across the trials that need no data and no cluster; raises ValueError."""
    if not trials:
        raise ValueError(f"sweep {sweep.name!r} expands to no trials")
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep {sweep.name!r}: trial names repeat: {names}")
    if sweep.scheduler != "asha":
        return
    for trial, job in zip(trials, jobs):
        every = job.eval.every_steps
        if every <= 0:
            raise ValueError(
                f"sweep trial {trial.name!r}: config key 'eval.every_steps': ASHA compares "
                "trials at evaluations, so it needs a period > 0"
            )
        if every % job.checkpoint.every_steps:
            raise ValueError(
                f"sweep trial {trial.name!r}: config key 'checkpoint.every_steps': "
                f"{job.checkpoint.every_steps} must divide eval.every_steps ({every}): "
                "results reach Tune with the checkpoint of each evaluation"
            )
        grace = sweep.grace_period or every
        if grace % every:
            raise ValueError(
                f"sweep {sweep.name!r}: asha.grace_period {grace} must be a multiple of "
                f"eval.every_steps ({every}) so ASHA's rungs fall on evaluations"
            )
    if len({j.solver.max_steps for j in jobs}) > 1:
        raise ValueError(
            f"sweep {sweep.name!r}: ASHA needs one solver.max_steps for every trial, got "
            f"{sorted({j.solver.max_steps for j in jobs})}"
        )


def asha_rungs(sweep: Sweep, eval_every: int, max_steps: int) -> list[int]:
    """The steps where ASHA compares trials: grace x rf^k below max_steps."""
    grace = sweep.grace_period or eval_every
    rungs, t = [], grace
    while t < max_steps:
        rungs.append(t)
        t *= sweep.reduction_factor
    return rungs


# Keys that set the size of the training images: a sweep that changes them changes what a trial
# costs far more than any other key (the paper's 800-1400 px against a CPU config's 256).
SIZE_KEYS = (
    "data.train_scales",
    "data.scale_range",
    "data.max_size",
    "model.transform.min_size",
    "model.transform.max_size",
)
PAPER_METRICS = {"segm_AP": "segm AP", "bbox_AP": "bbox AP"}


def describe(sweep: Sweep, trials: list[Trial], base: dict[str, Any] | None = None) -> str:
    """The trials as text: the overrides every trial shares, then one line a trial with the
    paper's numbers for its row; with the base job's flat config, which training sizes the
    sweep changes from it.
    """
    width = max(len(t.name) for t in trials)
    lines = [f"sweep {sweep.name!r}: {len(trials)} trial(s)"]
    if sweep.algorithm == "optuna":
        lines.append(f"Optuna's TPE draws the values of {trials[0].name} .. {trials[-1].name}:")
        lines += [
            f"  {k}: {kind} {_short(v)}" for k, s in sweep.search.items() for kind, v in s.items()
        ]
    if sweep.seeds > 1:
        lines.append(f"every row runs {sweep.seeds} times: seed=0..{sweep.seeds - 1} (-s<seed>)")
    if sweep.set:
        lines.append("every trial: " + _format(sweep.set))
    for t in trials if sweep.algorithm != "optuna" else []:
        own = {k: v for k, v in t.overrides.items() if k not in sweep.set or sweep.set[k] != v}
        line = f"  {t.name:<{width}}  {_format(own) or '(base config)'}"
        lines.append(line + (f"  [paper: {_paper(t.paper)}]" if t.paper else ""))
    if base is not None:
        lines += size_changes(trials, base)
    return "\n".join(lines)


def size_changes(trials: list[Trial], base: dict[str, Any]) -> list[str]:
    """Lines naming each training-size key the trials set to other values than the base job."""
    changed = []
    for key in SIZE_KEYS:
        own = _short(base[key])
        values = list(dict.fromkeys(_short(t.overrides[key]) for t in trials if key in t.overrides))
        values = [v for v in values if v != own]
        if values:
            changed.append(f"  {key}: {own} in the base config -> {' or '.join(values)}")
    if not changed:
        return []
    return [
        "note: the trials train at other image sizes than the base config (the sweep's values "
        "win over the config and --set):",
        *changed,
        "  (a CPU-sized run of these rows: copy the sweep file and lower these sizes; "
        "`--sweep demo` is a CPU sweep)",
    ]


def _paper(numbers: dict[str, float]) -> str:
    return ", ".join(f"{PAPER_METRICS.get(k, k)} {v:g}" for k, v in numbers.items())


def _format(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in overrides.items())


def _short(value: Any) -> str:
    """A value as YAML writes it (`true`, `null`), floats to 4 digits, lists without spaces."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).split("\n", 1)[0]
    return str(value)
