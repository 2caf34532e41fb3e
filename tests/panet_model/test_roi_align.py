"""The multi-level RoIAlign behind AFP: the sparse CPU path equals torchvision's kernel."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from panet_model.roi_align import multilevel_roi_align, sampling_matrix, transposed, use_fast_path

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def level_features(dtype: torch.dtype = torch.float32, channels: int = 5) -> list[torch.Tensor]:
    """Two images of 70 x 90 px seen at four strides (odd sizes on purpose)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(18, 23), (9, 12), (5, 6), (3, 3)]
    return [torch.randn(2, channels, h, w, generator=g, dtype=dtype) for h, w in shapes]


def hard_rois(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(K, 5): ordinary, tiny, degenerate (x2 < x1), partly and wholly outside, border RoIs."""
    boxes = [
        [0, 3.0, 4.0, 40.0, 50.0],
        [1, 10.2, 11.7, 11.0, 12.1],
        [0, 30.0, 30.0, 20.0, 25.0],
        [1, -20.0, -8.0, 15.0, 12.0],
        [0, 60.0, 50.0, 130.0, 95.0],
        [1, 200.0, 200.0, 260.0, 240.0],
        [0, 0.0, 0.0, 90.0, 70.0],
        [1, 88.9, 69.5, 90.0, 70.0],
    ]
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(24, 2, generator=g) * torch.tensor([90.0, 70.0])
    wh = torch.rand(24, 2, generator=g) * 60
    rand = torch.cat([torch.randint(0, 2, (24, 1), generator=g).float(), xy, xy + wh], 1)
    return torch.cat([torch.tensor(boxes), rand]).to(dtype)


def reference(features, rois, size, sampling, aligned):  # noqa: ANN001, ANN201
    return torch.stack(
        [roi_align(f, rois, size, s, sampling, aligned) for f, s in zip(features, SCALES)]
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 3e-5)])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling,size", [(2, (7, 7)), (1, (14, 14)), (3, (5, 4))])
def test_forward_and_backward_equal_torchvision(
    aligned: bool,
    sampling: int,
    size: tuple[int, int],
    dtype: torch.dtype,
    tol: float,
) -> None:
    feats = [f.requires_grad_() for f in level_features(dtype)]
    rois = hard_rois(dtype)
    assert use_fast_path(feats, rois, sampling)
    out = multilevel_roi_align(feats, rois, size, SCALES, sampling, aligned)
    ref = reference(feats, rois, size, sampling, aligned)
    assert out.shape == (4, rois.shape[0], 5, *size)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    mine = torch.autograd.grad(out, feats, grad_out)
    theirs = torch.autograd.grad(ref, feats, grad_out)
    for level, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"level {level}")
        assert a.abs().sum() > 0, f"level {level} got no gradient"


def test_float64_gradcheck() -> None:
    feats = [f[:, :2].clone().requires_grad_() for f in level_features(torch.float64)]
    rois = hard_rois(torch.float64)[:6]

    def pool(*fs: torch.Tensor) -> torch.Tensor:
        return multilevel_roi_align(fs, rois, (3, 3), SCALES, 2)

    assert torch.autograd.gradcheck(pool, tuple(feats))


@pytest.mark.parametrize("level", range(4))
def test_transposed_is_the_transpose(level: int) -> None:
    """Every level's matrix of the hard RoIs (repeated columns within a row included), and none."""
    n, _, h, w = level_features()[level].shape
    for rois in (hard_rois(), torch.zeros(0, 5)):
        a = sampling_matrix(rois, (n, h, w), SCALES[level], (7, 7), 2, False)
        at = transposed(a)
        assert at.layout == torch.sparse_csr and at.shape == (a.shape[1], a.shape[0])
        assert at.values().numel() == a.values().numel()
        torch.testing.assert_close(at.to_dense(), a.to_dense().t(), rtol=0, atol=0)
        if rois.shape[0]:
            g = torch.randn(a.shape[0], 3, generator=torch.Generator().manual_seed(level))
            torch.testing.assert_close(torch.mm(at, g), a.to_dense().t() @ g)


def test_no_rois() -> None:
    feats = [f.requires_grad_() for f in level_features()]
    out = multilevel_roi_align(feats, torch.zeros(0, 5), (7, 7), SCALES, 2)
    assert out.shape == (4, 0, 5, 7, 7)
    grads = torch.autograd.grad(out.sum(), feats, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_only_some_levels_need_gradients() -> None:
    feats = level_features()
    feats[1].requires_grad_()
    out = multilevel_roi_align(feats, hard_rois(), (7, 7), SCALES, 2)
    (grad,) = torch.autograd.grad(out.square().sum(), [feats[1]])
    assert grad.shape == feats[1].shape and grad.abs().sum() > 0


def test_other_settings_use_torchvision() -> None:
    feats = level_features()
    rois = hard_rois()
    assert not use_fast_path(feats, rois, 0)  # adaptive sampling
    bf16 = [f.bfloat16() for f in feats]
    assert not use_fast_path(bf16, rois.bfloat16(), 2)
    out = multilevel_roi_align(feats, rois, (7, 7), SCALES, 0)
    torch.testing.assert_close(out, reference(feats, rois, (7, 7), 0, False), rtol=0, atol=0)
