"""The worker loop's pieces: the step, the batch path, the learning rate it logs, the AMP check."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pipeline.config import load_job_config
from pipeline.data.batches import in_background
from pipeline.data.collate import collate_train, to_float_image
from pipeline.train import loop, progress
from pipeline.train.elastic import micro_batches
from pipeline.train.solver import build_optimizer, build_scheduler, lr_factor
from pipeline.train.step import StepResult, to_device, train_step


def job(**sets):
    base = {"data.train": "a", "data.val": "b", "solver.warmup_steps": 4, "log_every": 1}
    return load_job_config(None, {**base, **sets})


class Quadratic(nn.Module):
    """A stand-in for the detector: `model(images, targets)` -> a dict of loss terms."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        x = torch.stack([i.float().mean() for i in images])
        return {"loss_a": (self.w.sum() * x).pow(2).mean(), "loss_b": self.w.pow(2).sum()}


def test_progress_shows_the_learning_rate_the_step_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In warm-up the rate changes every step: step k is logged with lr_factor(k - 1)."""
    j = job(**{"solver.optimizer": "sgd"})
    model = Quadratic()
    optimizer = build_optimizer(model, j)
    scheduler = build_scheduler(optimizer, j)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    logged: list[dict[str, float]] = []
    monkeypatch.setattr(
        progress.tracking, "log_metrics", lambda uri, run, m, step: logged.append(m)
    )
    setup = loop.WorkerSetup(j, 2, {1: "a"}, {1: 1}, 100, "unused", "unused", None)
    state = loop.LoopState(step=0, metrics={})
    batch = ([torch.full((3, 4, 4), 100, dtype=torch.uint8)], [{}])
    for step in range(1, 4):
        result = train_step(model, [batch], optimizer, scheduler, scaler, j, torch.device("cpu"))
        state.step += 1
        loop.count_step(result, j, state, 0.0, world_size=1)
        assert result.bad is None and state.progress.window.steps == 1
        state.progress.log(j, (setup.tracking_uri, setup.run_id), step, torch.device("cpu"))
        assert state.progress.window.steps == 0  # a new window
        used = j.lr * lr_factor(step - 1, j)
        assert logged[-1]["train/lr"] == pytest.approx(used)
        assert f"| lr {used:.5f} |" in capsys.readouterr().out
    assert optimizer.param_groups[0]["lr"] == pytest.approx(j.lr * lr_factor(3, j))


def test_a_full_world_step_is_a_plain_sgd_step() -> None:
    """One micro-batch, one pass, no loss weight: bit-identical to forward, backward, step."""
    j = job(**{"solver.optimizer": "sgd", "solver.clip_grad_norm": 0.0})
    torch.manual_seed(0)
    model, reference = Scaled(), Scaled()
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, j)
    scheduler = build_scheduler(optimizer, j)
    expected_optimizer = build_optimizer(reference, j)
    build_scheduler(expected_optimizer, j)  # sets the warm-up rate of step 0
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = ([torch.rand(3, 2, 2), torch.rand(3, 2, 2)], [{}, {}])
    result = train_step(model, [batch], optimizer, scheduler, scaler, j, torch.device("cpu"))
    expected = reference(*batch)
    sum(expected.values()).backward()
    expected_optimizer.step()
    assert result.bad is None and result.images == 2 and result.lr == j.lr * lr_factor(0, j)
    assert torch.equal(result.losses["loss"], expected["loss"].detach())
    for got, want in zip(model.parameters(), reference.parameters()):
        assert torch.equal(got, want)


def test_bad_steps_are_counted_and_too_many_stop_the_job(
    capsys: pytest.CaptureFixture[str],
) -> None:
    j = job(**{"solver.max_bad_steps": 1})
    state = loop.LoopState(step=7, metrics={})
    bad = StepResult(losses={}, bad="loss_a=nan", lr=0.1, images=2)
    loop.count_step(bad, j, state, 0.0, world_size=1)
    window = state.progress.window
    assert state.progress.bad_steps == 1 and window.steps == 0 and window.lr == 0.1
    assert "step 7: skipped, loss not finite (loss_a=nan)" in capsys.readouterr().out
    with pytest.raises(FloatingPointError, match=r"solver.max_bad_steps=1"):
        loop.count_step(bad, j, state, 0.0, world_size=1)


def test_window_sums_loss_terms() -> None:
    window = progress.Window()
    for v in (1.0, 2.5):
        window.add({"loss_a": torch.tensor(v), "loss_b": torch.tensor(2 * v)}, 2, 0.5)
    assert {k: float(v) for k, v in window.losses.items()} == {"loss_a": 3.5, "loss_b": 7.0}
    assert (window.steps, window.images, window.data_wait) == (2, 4, 1.0)


def test_uint8_batch_becomes_the_float_batch_on_the_device() -> None:
    """Bytes go to the device and become floats there, bit-identical to a float collate."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for h, w in ((5, 7), (6, 4)):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        rows.append(
            {
                "image": pixels.numpy().tobytes(),
                "height": h,
                "width": w,
                "image_id": 1,
                "boxes": [],
                "labels": [],
                "rles": [],
            }
        )
    floats, _ = collate_train(rows)
    raw, targets = collate_train(rows, torch.uint8)
    assert all(i.dtype == torch.uint8 and i.is_contiguous() for i in raw)
    on_device, _ = to_device(raw, targets, torch.device("cpu"))
    for got, expected in zip(on_device, floats):
        assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert to_float_image(floats[0]) is floats[0]


def test_in_background_keeps_the_order_and_runs_ahead() -> None:
    produced: list[int] = []
    threads: set[str] = set()

    def batches():
        for i in range(6):
            threads.add(threading.current_thread().name)
            produced.append(i)
            yield [torch.tensor(i)], [{}]

    got = in_background(batches(), depth=2)
    first = next(got)
    assert int(first[0][0]) == 0
    rest = [int(images[0]) for images, _ in got]
    assert rest == [1, 2, 3, 4, 5]
    assert threads == {"batch-prefetch"}


def test_in_background_raises_the_producers_error() -> None:
    def batches():
        yield [torch.tensor(0)], [{}]
        raise RuntimeError("bad record")

    got = in_background(batches())
    next(got)
    with pytest.raises(RuntimeError, match="bad record"):
        next(got)


def test_in_background_close_stops_and_closes_the_source() -> None:
    closed = threading.Event()

    def batches():
        try:
            for i in range(1000):
                yield [torch.tensor(i)], [{}]
        finally:
            closed.set()

    got = in_background(batches(), depth=1)
    next(got)
    got.close()  # what leaving the training loop early does
    assert closed.is_set()
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())


def test_bf16_on_a_gpu_without_native_bf16_fails_at_start() -> None:
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=r"solver.amp=bf16: .*compute capability 8.0"):
        loop.check_amp_support("bf16", cuda, bf16_supported=lambda: False)
    loop.check_amp_support("bf16", cuda, bf16_supported=lambda: True)
    never = pytest.fail  # fp16, off, or a CPU worker never ask the GPU
    loop.check_amp_support("fp16", cuda, bf16_supported=never)
    loop.check_amp_support("off", cuda, bf16_supported=never)
    loop.check_amp_support("bf16", torch.device("cpu"), bf16_supported=never)


def test_bf16_check_does_not_count_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-Ampere GPUs create bfloat16 tensors (emulation): that is not support for AMP."""
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation,  # a Turing GPU's answers
    )
    with pytest.raises(ValueError, match="no native bfloat16"):
        loop.check_amp_support("bf16", torch.device("cuda"))


@pytest.mark.skipif(not progress.host_memory(), reason="needs /proc/self/status (Linux)")
def test_release_host_memory_returns_a_threads_freed_heap() -> None:
    """Blocks a batch thread allocated and the training thread freed stay resident until trimmed."""
    survivors: list[list[Tensor]] = []

    def batch_thread() -> None:
        blocks = [torch.empty(20_000, dtype=torch.uint8) for _ in range(20_000)]  # ~400 MB
        survivors.append(blocks[::50])  # a few live blocks keep the arena's heaps mapped
        del blocks

    thread = threading.Thread(target=batch_thread)
    thread.start()
    thread.join()
    before = progress.host_memory()["rss_anon_gb"]
    loop.release_host_memory()
    after = progress.host_memory()["rss_anon_gb"]
    assert before - after > 0.03, (before, after)  # tens of MB back to the OS


class Scaled(nn.Module):
    """A stand-in detector with two layers: `model(images, targets)` -> loss terms."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        x = torch.stack([i.flatten()[:4] for i in images])  # (B, 4)
        return {"loss": self.body(x).pow(2).mean()}


def test_gradients_stay_views_of_ddp_buckets_across_steps(tmp_path: Any) -> None:
    """With `gradient_as_bucket_view`, every backward accumulates into DDP's buckets.

    After the first backward DDP makes each `.grad` a view into its all-reduce bucket. Clearing
    gradients to None between steps would make autograd write every later gradient into a new
    tensor (then copied into the bucket): the hook sees where autograd accumulated.
    """
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Scaled(), gradient_as_bucket_view=True)
        j = job(**{"solver.optimizer": "sgd"})
        optimizer = build_optimizer(model.module, j)
        scheduler = build_scheduler(optimizer, j)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        params = [p for p in model.parameters() if p.requires_grad]
        # Where autograd accumulated each gradient, and where the optimizer found it.
        accumulated: list[set[int]] = [set() for _ in params]
        stepped: list[set[int]] = [set() for _ in params]
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(
                lambda p, i=i: accumulated[i].add(p.grad.data_ptr())
            )

        def at_step(*_: Any) -> None:
            for i, p in enumerate(params):
                stepped[i].add(p.grad.data_ptr())

        optimizer.register_step_pre_hook(at_step)
        batch = ([torch.rand(3, 2, 2)], [{}])
        bad = ([torch.full((3, 2, 2), math.nan)], [{}])

        def step(batches: list[Any], share: Any = None) -> str | None:
            args = (model, batches, optimizer, scheduler, scaler, j, torch.device("cpu"))
            return (train_step(*args, share) if share else train_step(*args)).bad

        # DDP makes the gradients bucket views in the first backward, and rebuilds its buckets
        # in the order gradients arrived at the second forward.
        for _ in range(2):
            step([batch])
        for sets in (*accumulated, *stepped):
            sets.clear()
        assert step([batch]) is None
        assert step([bad]) is not None  # skipped
        assert step([batch]) is None
        two = micro_batches(max_workers=2, world_size=1, rank=0)  # no_sync, then the all-reduce
        assert step([batch, bad], two) is not None
        assert step([batch, batch], two) is None
        assert all(len(s) == 1 for s in stepped)  # one bucket view per parameter throughout
        assert accumulated == stepped  # ... and autograd wrote into it, no copy
    finally:
        dist.destroy_process_group()
