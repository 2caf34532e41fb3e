"""The paper's recipe (warm-up, step decay, no weight decay on norms and biases), and the
budget-aware linear and cosine decays."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pipeline.config import load_job_config
from pipeline.train.solver import build_optimizer, build_scheduler, lr_factor, param_groups


def job(**sets):
    base = {
        "data.train": "a",
        "data.val": "b",
        "solver.warmup_steps": 10,
        "solver.decay_steps": [20, 30],
    }
    return load_job_config(None, {**base, **sets})


def test_lr_schedule() -> None:
    j = job()
    assert lr_factor(0, j) == pytest.approx(1 / 3)
    assert lr_factor(5, j) == pytest.approx(1 / 3 + (1 - 1 / 3) * 0.5)
    assert lr_factor(10, j) == 1.0
    assert lr_factor(20, j) == pytest.approx(0.1)
    assert lr_factor(35, j) == pytest.approx(0.01)


def test_param_groups_and_scheduler() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    j = job(**{"solver.bias_lr_factor": 2.0})
    groups = param_groups(model, j)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(model[2].weight)}
    assert ids[1] == {id(model[1].weight), id(model[1].bias)}
    assert ids[2] == {id(model[0].bias), id(model[2].bias)}
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 0.0]
    opt = build_optimizer(model, j)
    sched = build_scheduler(opt, j)
    assert opt.param_groups[0]["lr"] == pytest.approx(j.lr / 3)
    assert opt.param_groups[2]["lr"] == pytest.approx(2 * j.lr / 3)
    for _ in range(25):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(j.lr * 0.1)
    assert torch.is_tensor(model[2].weight)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_budget_schedules_decay_to_the_final_factor(schedule: str) -> None:
    j = job(
        **{
            "solver.schedule": schedule,
            "solver.decay_steps": [],
            "solver.max_steps": 110,
            "solver.final_lr_factor": 0.05,
        }
    )
    assert lr_factor(0, j) == pytest.approx(1 / 3)  # the same warm-up
    assert lr_factor(10, j) == 1.0  # the peak at the end of warm-up
    assert lr_factor(60, j) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way, either shape
    quarter = 0.75 if schedule == "linear" else 0.5 * (1 + 2**-0.5)
    assert lr_factor(35, j) == pytest.approx(0.05 + 0.95 * quarter)
    assert lr_factor(110, j) == pytest.approx(0.05)
    assert lr_factor(500, j) == pytest.approx(0.05)  # beyond max_steps: stays at the floor
    factors = [lr_factor(s, j) for s in range(10, 111)]
    assert all(a > b for a, b in zip(factors, factors[1:]))  # strictly decreasing


def test_budget_schedules_reject_decay_steps() -> None:
    with pytest.raises(ValueError, match="solver.decay_steps.*'linear'"):
        job(**{"solver.schedule": "linear"})  # job() sets decay steps [20, 30]
    with pytest.raises(ValueError, match="solver.schedule"):
        job(**{"solver.schedule": "exponential", "solver.decay_steps": []})
    with pytest.raises(ValueError, match="solver.final_lr_factor"):
        job(**{"solver.schedule": "cosine", "solver.decay_steps": [], "solver.final_lr_factor": 2})


def test_adamw_uses_the_same_groups_and_schedule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    j = job(**{"solver.optimizer": "adamw", "solver.base_lr": 1e-3, "solver.betas": [0.8, 0.99]})
    opt = build_optimizer(model, j)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0, 0.0]
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    sched = build_scheduler(opt, j)
    assert opt.param_groups[0]["lr"] == pytest.approx(j.lr / 3)  # warm-up applies as for SGD
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    first = None
    for _ in range(12):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert loss.item() < first
    assert opt.param_groups[0]["lr"] == pytest.approx(j.lr)  # past warm-up, before decay
    # The state round-trips through a checkpoint's safe loading.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    again = build_optimizer(model, j)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(again.state_dict()["state"][0][key], value), key


def test_optimizer_options_are_checked() -> None:
    with pytest.raises(ValueError, match="solver.optimizer.*'adam'"):
        job(**{"solver.optimizer": "adam"})
    with pytest.raises(ValueError, match="solver.betas"):
        job(**{"solver.betas": [0.9, 1.0]})
    with pytest.raises(ValueError, match="solver.betas"):
        job(**{"solver.betas": [0.9]})
