"""Resuming a job: optimizer state on the parameters' device, AMP scaler states, RNG states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_job_config
from pipeline.state_file import load_state, save_state
from pipeline.train import checkpoints
from pipeline.train.checkpoints import restore_training_state, rng_state
from pipeline.train.loop import build_training

NUM_CLASSES = 3


def job(**sets):
    base = {"data.train": "a", "data.val": "b", "model.preset": "tiny", "solver.warmup_steps": 2}
    return load_job_config(None, {**base, **sets})


def saved_run(tmp_path: Path, j) -> dict:
    """A checkpoint of a CPU float32 run after two optimizer steps (momentum / exp_avg set)."""
    torch.manual_seed(0)
    model, optimizer, scheduler, scaler = build_training(j, NUM_CLASSES, torch.device("cpu"))
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    save_state(
        tmp_path,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        rng=rng_state(),
        step=2,
    )
    return load_state(tmp_path)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_resume_puts_optimizer_state_on_each_parameters_device(tmp_path: Path) -> None:
    """A checkpoint from a CPU run resumed on another device type: every state tensor follows.

    "meta" stands in for a GPU: the optimizer's `load_state_dict` casts state to the device
    and dtype its parameter has at that moment, whatever the device type. (Moving a model to
    "meta" after building the optimizer would even replace the Parameter objects.)
    """
    j = job(**{"solver.optimizer": "sgd"})
    state = saved_run(tmp_path, j)
    device = torch.device("meta")
    model, optimizer, scheduler, _ = build_training(j, NUM_CLASSES, device, state)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    own = {id(p) for p in model.parameters()}
    assert params and all(id(p) in own and p.device.type == "meta" for p in params)
    assert len(optimizer.state) == len(params)
    for p in params:
        buffers = [v for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
        assert buffers, "SGD with momentum keeps a momentum buffer per parameter"
        for v in buffers:
            assert (v.device, v.dtype) == (p.device, p.dtype)
    assert scheduler.last_epoch == 2


@pytest.mark.parametrize(("saved_fp16", "resumed_fp16"), [(False, True), (True, False)])
def test_resume_with_amp_switched(tmp_path: Path, saved_fp16: bool, resumed_fp16: bool) -> None:
    """A run without fp16 AMP saves `{}` for its scaler; resuming it with fp16 AMP (or the
    other way round) starts from the scaler's initial state instead of raising."""
    j = job()
    state = saved_run(tmp_path, j)
    state["scaler"] = torch.amp.GradScaler("cpu", enabled=saved_fp16, init_scale=8.0).state_dict()
    assert (state["scaler"] == {}) != saved_fp16
    model, optimizer, scheduler, _ = build_training(j, NUM_CLASSES, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=resumed_fp16)
    restore_training_state(state, model, optimizer, scheduler, scaler)
    if resumed_fp16:
        assert scaler.get_scale() == 2.0**16  # the initial scale: nothing to resume from


def test_rng_state_is_the_current_cuda_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved from device 1 of 4, restored on device 0 of 1: only the own device's state moves."""
    saved = torch.arange(8, dtype=torch.uint8)
    restored: list[tuple[torch.Tensor, int]] = []

    def every_device(*_args: object) -> None:
        raise AssertionError("must not touch the RNG of every visible device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved + device)
    state = checkpoints.rng_state()
    assert torch.equal(state["cuda"], saved + 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    checkpoints.set_rng_state(state)
    assert len(restored) == 1
    assert torch.equal(restored[0][0], saved + 1) and restored[0][1] == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cpu_checkpoint_resumes_on_a_gpu_and_steps(tmp_path: Path, optimizer: str) -> None:
    """The fused AdamW and foreach SGD kernels refuse state left on the CPU."""
    j = job(**{"solver.optimizer": optimizer})
    state = saved_run(tmp_path, j)
    device = torch.device("cuda")
    model, opt, _, _ = build_training(j, NUM_CLASSES, device, state)
    for group in opt.param_groups:
        for p in group["params"]:
            assert p.device.type == "cuda"
            for v in opt.state[p].values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    assert v.device == p.device
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    torch.cuda.synchronize()
