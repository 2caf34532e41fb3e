"""Progress lines: a window of steps' losses and throughput, averaged over ranks, printed and
logged to MLflow by rank 0."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline import tracking
from pipeline.config import JobConfig
from pipeline.data.batches import ReaderStats
from pipeline.train.step import world


@dataclass
class Window:
    """Throughput and loss accumulators between two progress lines.

    Loss terms are summed on their device and read once per progress line: a `float()` per
    term and step would wait for the device every step.
    """

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    data_wait: float = 0.0
    steps: int = 0
    losses: dict[str, Tensor] = field(default_factory=dict)
    lr: float = math.nan  # the learning rate of the window's last step

    def add(self, loss_dict: dict[str, Tensor], images: int, data_wait: float) -> None:
        self.steps += 1
        self.images += images
        self.data_wait += data_wait
        for k, v in loss_dict.items():
            v = v.detach().to(torch.float64)
            self.losses[k] = self.losses[k] + v if k in self.losses else v


@dataclass
class Progress:
    """One run of the loop's progress lines (a restarted worker group begins a new one)."""

    # The step this run started from: the ETA uses this run's rate, not a resumed job's.
    start_step: int
    start: float = field(default_factory=time.perf_counter)
    window: Window = field(default_factory=Window)  # the steps since the last line
    stats: ReaderStats = field(default_factory=ReaderStats)  # the train reader's, cumulative
    bad_steps: int = 0  # steps skipped because a loss was not finite
    train_loss: float = math.nan  # the loss of the last line (rank 0)

    def log(self, job: JobConfig, run: tuple[str, str], step: int, device: torch.device) -> None:
        """Average the window over ranks (every rank calls this); rank 0 prints a progress
        line and logs it to MLflow run `run` (tracking URI, run id). A new window begins."""
        self._report(job, run, step, device)
        # Started after the line: the time logging takes is in no window's throughput.
        self.window = Window()

    def _report(
        self, job: JobConfig, run: tuple[str, str], step: int, device: torch.device
    ) -> None:
        window = self.window
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        names = sorted(window.losses)
        steps = max(window.steps, 1)
        values = [float(window.losses[k]) / steps for k in names] + [window.data_wait / elapsed]
        averaged = all_reduce_mean(values, device)
        losses = dict(zip(names, averaged[: len(names)]))
        data_wait_fraction = averaged[-1]
        if world()[0] != 0:
            return
        images_per_s = window.images / elapsed
        total = self.train_loss = sum(losses.values())
        rate = (step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
        eta = (job.solver.max_steps - step) / rate if rate > 0 else math.inf
        terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items())
        print(
            f"[train] step {step}/{job.solver.max_steps} | loss {total:.3f} ({terms}) "
            f"| lr {window.lr:.5f} | {images_per_s:.1f} img/s "
            f"| data wait {100 * data_wait_fraction:.0f}% | ETA {_duration(eta)}",
            flush=True,
        )
        metrics = {f"train/{k}": v for k, v in losses.items()}
        metrics.update(
            {
                "train/loss": total,
                "train/lr": window.lr,
                "train/images_per_s": images_per_s,
                "train/data_wait_fraction": data_wait_fraction,
                "train/bad_steps": self.bad_steps,
            }
        )
        metrics.update({f"data/{k}": v for k, v in self.stats.as_dict().items()})
        metrics.update({f"host/{k}": v for k, v in host_memory().items()})
        tracking.log_metrics(*run, metrics, step)


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of a few floats, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _, size = world()
    if size > 1:
        dist.all_reduce(t)
        t /= size
    return t.tolist()


def host_memory() -> dict[str, float]:
    """This process's resident memory in GB from /proc/self/status; {} where there is none.

    `rss_anon_gb` is the process's own heap; `rss_shmem_gb` counts pages of shared memory it
    touched (Ray's object store), which the kernel reports as resident in every reader.
    """
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    fields = {"RssAnon": "rss_anon_gb", "RssFile": "rss_file_gb", "RssShmem": "rss_shmem_gb"}
    memory = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            memory[fields[key]] = int(value.split()[0]) / 2**20  # kB -> GB
    return memory


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
