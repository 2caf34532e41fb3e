"""Workers flush subnormal floats: a saturated softmax's gradient would otherwise hold them."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.loop import flush_denormals

TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32


def subnormal_fraction(t: torch.Tensor) -> float:
    return float(((t.abs() < TINY) & (t != 0)).float().mean())


def saturated_logit_grad() -> torch.Tensor:
    """The gradient of cross-entropy at logits spread by ~100, as a norm-free box head gives."""
    logits = torch.linspace(0.0, 100.0, 81).repeat(64, 1).requires_grad_()
    labels = torch.full((64,), 80)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert logits.grad is not None
    return logits.grad


def test_flush_denormals_removes_subnormal_gradients() -> None:
    try:
        torch.set_flush_denormal(False)
        assert subnormal_fraction(saturated_logit_grad()) > 0.05
        flush_denormals()
        assert subnormal_fraction(saturated_logit_grad()) == 0.0
        assert torch.tensor([1e-39]).mul(1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


class Stop(Exception):
    pass


def test_worker_loop_flushes_before_training(monkeypatch) -> None:
    from pipeline.train import loop

    def stop() -> tuple[int, int]:
        raise Stop

    monkeypatch.setattr(loop, "quiet_worker", lambda: None)
    monkeypatch.setattr(loop, "world", stop)  # the loop's first step after its process setup
    try:
        torch.set_flush_denormal(False)
        with pytest.raises(Stop):
            loop.train_loop_per_worker({"job": None})
        assert torch.tensor([1e-39]).mul(1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
