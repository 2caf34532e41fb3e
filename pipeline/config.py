"""The training job's configuration: YAML plus `--set dotted.key=value`, validated up front.

Every section is a frozen dataclass; `model` is the model library's `PANetConfig`, built from
`model.preset` and then overridden key by key, so `--set model.afp.fusion=sum` works like any
other key. Nothing here touches Ray: a bad config fails before the cluster is contacted.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from panet_model import PANetConfig
from panet_model.config import apply_overrides, flatten, require, to_plain
from pipeline import safe_yaml

if TYPE_CHECKING:
    from pipeline.data.augment import AugmentConfig
    from pipeline.storage import StoragePath


@dataclass(frozen=True)
class DataSection:
    train: str = ""  # shard directory of the training records
    val: str = ""  # shard directory of the validation records
    train_scales: tuple[int, ...] = (1200, 1000, 800, 600, 400)  # MST short sides (paper code)
    scale_range: bool = False  # sample the short side uniformly in [min, max] of train_scales
    max_size: int = 1400  # long side cap of the training resize
    flip_prob: float = 0.5  # horizontal flip probability
    decode_cpus: float = 1.0  # logical CPUs per Ray Data decode task
    decode_concurrency: int = 0  # most decode tasks at a time, 0 = as many as the CPUs allow
    group_window: int = 8  # steps whose images are regrouped by orientation and size (1: off)
    preserve_order: bool = True  # each rank reads the same records in the same order every run


@dataclass(frozen=True)
class SolverSection:
    ims_per_batch: int = 16  # global batch: images per step over all workers
    base_lr: float = 0.02  # learning rate for base_batch images (paper: 0.02 at 16)
    base_batch: int = 16  # the lr scales linearly with ims_per_batch / base_batch
    max_steps: int = 160000  # optimizer steps in all (paper: 120k + 40k)
    schedule: Literal["step", "linear", "cosine"] = "step"  # lr after warm-up (paper: step)
    decay_steps: tuple[int, ...] = (120000,)  # "step": steps where the lr is multiplied by gamma
    gamma: float = 0.1  # "step": decay factor
    final_lr_factor: float = 0.0  # "linear"/"cosine": lr at max_steps, as a fraction of the peak
    warmup_steps: int = 500  # linear warm-up length (authors' code)
    warmup_factor: float = 0.3333333333333333  # warm-up starts at this fraction of the lr
    optimizer: Literal["sgd", "adamw"] = "sgd"  # paper: SGD; AdamW learns faster from scratch
    momentum: float = 0.9  # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    weight_decay: float = 1e-4  # on weights (AdamW: decoupled, scaled by the lr)
    weight_decay_norm: float = 0.0  # on norm parameters and biases (authors' code: none)
    bias_lr_factor: float = 1.0  # bias learning rate multiplier (authors' code: 2)
    clip_grad_norm: float = 0.0  # max gradient norm, 0 = no clipping
    amp: Literal["off", "bf16", "fp16"] = "off"  # mixed precision on GPU (CPU runs fp32)
    max_bad_steps: int = 0  # NaN/inf steps skipped before the run stops with an error


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 2  # Ray Train workers (DDP ranks); YAML [min, max] sets min_workers too
    min_workers: int = 0  # elastic: go on with down to this many workers (0: fixed size)
    worker_resource: str = ""  # a custom Ray resource each worker takes one unit of ("": none)
    resize_interval_s: float = 60.0  # elastic: seconds between looks for capacity to grow back
    use_gpu: bool = False  # one GPU per worker, NCCL; CPU workers use gloo
    cpus_per_worker: float = 1.0  # logical CPUs reserved by each worker


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 2000  # checkpoint period in steps (and one at the end)
    keep_best: int = 3  # checkpoints kept by segm AP (the latest is always kept too)
    storage_path: str = "runs"  # checkpoints, Ray results and the local MLflow store


@dataclass(frozen=True)
class EvalSection:
    every_steps: int = 0  # evaluation period in steps, 0 = only at the end
    batch_size: int = 2  # images per inference batch on each worker
    pictures: int = 4  # validation images drawn with predictions at each evaluation


@dataclass(frozen=True)
class TrackingSection:
    uri: str = ""  # MLflow tracking URI; MLFLOW_TRACKING_URI wins; empty = local SQLite
    experiment: str = "panet"  # MLflow experiment name
    log_model: bool = True  # log the final model with mlflow.pytorch
    flush_timeout_s: float = 60.0  # server: seconds the job's end waits to deliver its records
    retry_max_s: float = 10.0  # server: the longest pause between two tries to deliver a record


@dataclass(frozen=True)
class RaySection:
    address: str = ""  # cluster address; empty = RAY_ADDRESS or a new local instance
    num_cpus: int = 0  # logical CPUs of a new local instance, 0 = enough for workers + data
    max_failures: int = 3  # worker failures recovered from the last checkpoint
    capacity_wait_s: float = 1800.0  # room to restart the workers, awaited this long (0: no limit)
    check_resources: bool = True  # refuse a job the cluster cannot hold (autoscaling: warn)


@dataclass(frozen=True)
class JobConfig:
    name: str = "panet"  # job name; re-running the same name resumes it
    seed: int = 0  # seeds model init, data order and augmentation
    log_every: int = 20  # steps between progress lines and metric logs
    model_preset: str = "tiny"  # preset the model section starts from
    model: PANetConfig = field(default_factory=lambda: PANetConfig.preset("tiny"))
    data: DataSection = field(default_factory=DataSection)
    solver: SolverSection = field(default_factory=SolverSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    ray: RaySection = field(default_factory=RaySection)

    @property
    def lr(self) -> float:
        """The peak learning rate after linear scaling with the global batch."""
        return self.solver.base_lr * self.solver.ims_per_batch / self.solver.base_batch

    def augment(self) -> AugmentConfig:
        """The Ray Data reader's augmentation settings."""
        # deferred: `panet --help` imports this module (the storage and augment modules load pyarrow, PIL)
        from pipeline.data.augment import AugmentConfig

        d = self.data
        return AugmentConfig(
            scales=tuple(d.train_scales),
            scale_range=d.scale_range,
            max_size=d.max_size,
            flip_prob=d.flip_prob,
            seed=self.seed,
        )

    @property
    def local_batch_size(self) -> int:
        return self.solver.ims_per_batch // self.scaling.num_workers

    @property
    def run_dir(self) -> Path | StoragePath:
        """The job's directory: a `Path`, or a `StoragePath` when the storage is a URI."""
        from pipeline.storage import as_path

        return as_path(self.checkpoint.storage_path) / self.name

    def flat(self) -> dict[str, Any]:
        """Every key as `{"dotted.key": value}` (the model's under `model.`)."""
        out = {
            k: v for k, v in flatten(dataclasses.asdict(self)).items() if not k.startswith("model.")
        }
        out.update({f"model.{k}": v for k, v in self.model.flat().items()})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values, loadable again with `load_job_config`."""
        out = to_plain(dataclasses.asdict(self))
        out["model"] = {"preset": self.model_preset, **self.model.to_dict()}
        del out["model_preset"]
        return out

    def validate(self) -> None:
        """Cross-field checks that need no cluster; raises ValueError naming the key."""
        self.model.validate()
        require(bool(self.name) and "/" not in self.name, "name", "a non-empty name without '/'")
        self._validate_scaling_and_solver()
        self._validate_checkpoint_and_eval()
        require(len(self.data.train_scales) > 0, "data.train_scales", "at least one size")
        require(0 <= self.data.flip_prob <= 1, "data.flip_prob", "a probability")
        require(self.data.decode_cpus > 0, "data.decode_cpus", "> 0")
        require(self.ray.capacity_wait_s >= 0, "ray.capacity_wait_s", ">= 0 (0: wait for ever)")
        require(self.tracking.flush_timeout_s >= 0, "tracking.flush_timeout_s", ">= 0")
        require(self.tracking.retry_max_s > 0, "tracking.retry_max_s", "> 0")
        require(self.data.decode_concurrency >= 0, "data.decode_concurrency", ">= 0 (0: no cap)")
        require(self.data.group_window >= 1, "data.group_window", ">= 1 (1 turns grouping off)")
        require(self.log_every >= 1, "log_every", ">= 1")
        try:
            self.augment()
        except ValueError as err:
            raise ValueError(f"config key 'data.train_scales': {err}") from err
        require(bool(self.data.train), "data.train", "the training shard directory")
        require(bool(self.data.val), "data.val", "the validation shard directory")

    def _validate_scaling_and_solver(self) -> None:
        """`validate`'s checks of `scaling` and `solver` (the batch is split over the workers)."""
        s, sc = self.solver, self.scaling
        require(sc.num_workers >= 1, "scaling.num_workers", ">= 1")
        require(
            0 <= sc.min_workers <= sc.num_workers,
            "scaling.num_workers",
            f"[min, max] with 1 <= min <= max (got min {sc.min_workers}, max {sc.num_workers})",
        )
        require(sc.cpus_per_worker > 0, "scaling.cpus_per_worker", "> 0")
        require(
            s.ims_per_batch % sc.num_workers == 0 and s.ims_per_batch >= sc.num_workers,
            "solver.ims_per_batch",
            f"a multiple of scaling.num_workers ({sc.num_workers})",
        )
        require(s.max_steps >= 1, "solver.max_steps", ">= 1")
        require(s.base_lr > 0, "solver.base_lr", "> 0")
        require(0 < s.warmup_factor <= 1, "solver.warmup_factor", "in (0, 1]")
        require(
            list(s.decay_steps) == sorted(s.decay_steps), "solver.decay_steps", "increasing steps"
        )
        require(
            s.schedule == "step" or not s.decay_steps,
            "solver.decay_steps",
            f"[] with solver.schedule {s.schedule!r} (decay steps belong to the 'step' schedule)",
        )
        require(0 <= s.final_lr_factor <= 1, "solver.final_lr_factor", "in [0, 1]")
        require(all(0 <= b < 1 for b in s.betas), "solver.betas", "two values in [0, 1)")
        require(s.warmup_steps >= 0, "solver.warmup_steps", ">= 0")
        require(s.max_bad_steps >= 0, "solver.max_bad_steps", ">= 0")

    def _validate_checkpoint_and_eval(self) -> None:
        """`validate`'s checks of `checkpoint` and `eval` (their steps must line up)."""
        s, sc = self.solver, self.scaling
        require(self.checkpoint.every_steps >= 1, "checkpoint.every_steps", ">= 1")
        require(self.checkpoint.keep_best >= 1, "checkpoint.keep_best", ">= 1")
        require(self.eval.every_steps >= 0, "eval.every_steps", ">= 0")
        # COCOeval runs on rank 0 alone; the other ranks wait for it at the checkpoint's
        # `ray.train.report` (Ray Train's barrier: no timeout unless RAY_TRAIN_COLLECTIVE_TIMEOUT_S
        # sets one). Without a checkpoint at that step they would wait in the next step's NCCL
        # all-reduce, which aborts after the process group's timeout (Ray Train's default: 30
        # minutes). The last step always has both.
        ev, ck = self.eval.every_steps, self.checkpoint.every_steps
        require(
            sc.num_workers == 1 or not 0 < ev < s.max_steps or ev % ck == 0,
            "eval.every_steps",
            f"a multiple of checkpoint.every_steps ({ck}) with {sc.num_workers} workers, got "
            f"{ev}: every evaluation needs a checkpoint at the same step, where all ranks wait "
            "for rank 0's COCOeval",
        )
        require(self.eval.batch_size >= 1, "eval.batch_size", ">= 1")


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[1, 2]"]` -> `{"a.b": 1, "c": [1, 2]}`; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected dotted.key=value")
        out[key.strip()] = safe_yaml.load_text(raw, f"--set {key.strip()}") if raw.strip() else ""
    return out


def load_job_config(path: str | Path | None, sets: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job config, apply `--set` overrides, and validate everything.

    Args:
        path: a YAML file, a shipped config's name (`tiny_synth`), or None for the defaults.
        sets: dotted overrides, applied after the file.

    Raises:
        ValueError: naming the file or the key that is wrong.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config(path)
        loaded = safe_yaml.load_file(p, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r}: expected a mapping at the top level")
        data = loaded or {}
    updates = flatten(data)
    updates.update(sets or {})
    updates = _split_worker_range(updates)
    if "model_preset" in updates:
        raise ValueError("config key 'model_preset': set 'model.preset' instead")
    preset = updates.pop("model.preset", "tiny")
    if not isinstance(preset, str):
        raise ValueError(f"config key 'model.preset': expected a preset name, got {preset!r}")
    job = JobConfig(model_preset=preset, model=PANetConfig.preset(preset))
    job = apply_overrides(job, updates)
    job.validate()
    return with_absolute_paths(job)


# The `jobs` package ships its configs/ and sweeps/ as package data, so a config or sweep is
# reachable by name from any directory, also after a non-editable `pip install .`.
SHIPPED_PACKAGE = "jobs"
_extracted: contextlib.ExitStack | None = None  # shipped files copied out of a zipped install


def shipped_names(kind: Literal["configs", "sweeps"]) -> list[str]:
    """The names of the YAML files shipped in `jobs/<kind>/`, e.g. `["coco_panet_r50", ...]`."""
    folder = resources.files(SHIPPED_PACKAGE) / kind
    return sorted(e.name[: -len(".yaml")] for e in folder.iterdir() if e.name.endswith(".yaml"))


def resolve_shipped(value: str | Path, kind: Literal["configs", "sweeps"]) -> Path:
    """A YAML file given as a path, or by the name of one shipped in `jobs/<kind>/`.

    An existing file wins; otherwise a bare name (`tiny_synth` or `tiny_synth.yaml`) means the
    shipped file of that name.

    Raises:
        ValueError: neither a file nor a shipped name; the message lists the shipped names.
    """
    p = Path(value).expanduser()
    if p.is_file():
        return p
    what = kind[:-1]
    name = str(value).removesuffix(".yaml")
    names = shipped_names(kind)
    if name in names:
        return _local_file(resources.files(SHIPPED_PACKAGE) / kind / f"{name}.yaml")
    # A checkout path from another directory (`jobs/configs/tiny_synth.yaml`) names the file.
    hint = f"; did you mean {p.stem}?" if p.suffix == ".yaml" and p.stem in names else ""
    raise ValueError(
        f"{what} file {str(value)!r} does not exist, and no {what} of that name is shipped "
        f"(shipped {kind}, by name: {', '.join(names)}){hint}"
    )


def resolve_config(value: str | Path) -> Path:
    """A job config file: a path, or a shipped config's name (`resolve_shipped`)."""
    return resolve_shipped(value, "configs")


def _local_file(resource: Any) -> Path:
    """A real file for a package resource: itself when installed as files, else a temporary copy
    (a zipped install) that lives until the process exits."""
    if isinstance(resource, Path):
        return resource
    global _extracted
    if _extracted is None:
        _extracted = contextlib.ExitStack()
        atexit.register(_extracted.close)
    return _extracted.enter_context(resources.as_file(resource))


def _split_worker_range(updates: dict[str, Any]) -> dict[str, Any]:
    """`scaling.num_workers: [min, max]` -> num_workers max, min_workers min (elastic)."""
    value = updates.get("scaling.num_workers")
    if not isinstance(value, (list, tuple)):
        return updates
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(
            f"config key 'scaling.num_workers': expected a count or [min, max], got {value!r}"
        )
    if value[0] < 1:
        raise ValueError(f"config key 'scaling.num_workers': min must be >= 1, got {value!r}")
    out = dict(updates)
    out["scaling.min_workers"], out["scaling.num_workers"] = value
    return out


def _absolute(path: str) -> str:
    return path if "://" in path or not path else str(Path(path).expanduser().resolve())


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """Local paths made absolute: Ray workers do not run in the driver's directory."""
    return dataclasses.replace(
        job,
        data=dataclasses.replace(
            job.data, train=_absolute(job.data.train), val=_absolute(job.data.val)
        ),
        checkpoint=dataclasses.replace(
            job.checkpoint, storage_path=_absolute(job.checkpoint.storage_path)
        ),
    )


def decode_options(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Data decode task options of a job's resolved config (`JobConfig.to_dict()`)."""
    data = config.get("data", {})
    return {
        "num_cpus": data.get("decode_cpus"),
        "concurrency": data.get("decode_concurrency") or None,
    }
