"""RoIAlign of the same RoIs on every level, with a fast CPU path (AFP's pooling).

torchvision's CPU RoIAlign recomputes the bilinear weights for every channel in the
backward pass, which makes it ~4-10x slower than its forward; AFP pools every RoI on four
levels, so that backward dominated AFP's extra training time. RoIAlign is linear in the
features: pooled = A @ features, with A a sparse matrix holding, per output bin, the
bilinear weights of its S x S sampling points (4 corners each). On CPU we build A once per
level (vectorized, the same arithmetic as torchvision's kernel) and run forward and backward
as one sparse-dense product each (A @ x, A^T @ grad), which PyTorch runs multi-threaded.
A^T is built by one stable sort of A's column indices (`transposed`): `a.t()` is a CSC view
that `torch.mm` would first convert to CSR through a generic path ~2-3x slower, a conversion
that costs more than both products together.
On GPU, for adaptive sampling (sampling_ratio <= 0) and for dtypes other than float32/64,
torchvision's kernel is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

FAST_DTYPES = (torch.float32, torch.float64)


def multilevel_roi_align(
    features: Sequence[Tensor],
    rois: Tensor,
    output_size: tuple[int, int],
    scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign every RoI on every level.

    Args:
        features: L feature maps, each (N, C, H_l, W_l).
        rois: (K, 5) batch index, x1, y1, x2, y2 in image coordinates.
        output_size: (PH, PW).
        scales: per level, feature size / image size.
        sampling_ratio: sampling points per bin side (> 0 for the fast path).
        aligned: torchvision's half-pixel alignment flag.

    Returns:
        (L, K, C, PH, PW), level-major.
    """
    if use_fast_path(features, rois, sampling_ratio):
        out: Tensor = _SparseRoIAlign.apply(
            rois, tuple(output_size), tuple(scales), sampling_ratio, aligned, *features
        )
        return out
    pooled = [
        roi_align(f, rois, output_size, s, sampling_ratio, aligned)
        for f, s in zip(features, scales)
    ]
    return torch.stack(pooled)  # L x (K, C, PH, PW) -> (L, K, C, PH, PW)


def use_fast_path(features: Sequence[Tensor], rois: Tensor, sampling_ratio: int) -> bool:
    """The sparse path: CPU tensors of float32/float64 and a fixed sampling ratio."""
    return (
        sampling_ratio > 0
        and rois.device.type == "cpu"
        and all(f.device.type == "cpu" and f.dtype in FAST_DTYPES for f in features)
        and all(f.dtype == rois.dtype for f in features)
    )


def sampling_matrix(
    rois: Tensor,
    feature_shape: tuple[int, int, int],
    scale: float,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The sparse CSR matrix A of RoIAlign on one level: pooled (K*PH*PW, C) = A @ x (N*H*W, C).

    Every row (one output bin) holds S*S*4 entries: the bilinear corner weights of each
    sampling point divided by S*S, zero for points outside the map, as in torchvision.
    """
    n, h, w = feature_shape
    ph, pw = output_size
    s = sampling_ratio
    k = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - x1
    roi_h = rois[:, 4] * scale - offset - y1
    if not aligned:  # torchvision forces malformed RoIs to be 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    y = _sample_coords(y1, roi_h / ph, ph, s)  # (K, PH*S)
    x = _sample_coords(x1, roi_w / pw, pw, s)  # (K, PW*S)
    y_lo, y_hi, y_w_lo, y_w_hi, y_ok = _bilinear_axis(y, h)
    x_lo, x_hi, x_w_lo, x_w_hi, x_ok = _bilinear_axis(x, w)
    # corners in torchvision's order: (lo, lo), (lo, hi), (hi, lo), (hi, hi)
    yi = torch.stack([y_lo, y_lo, y_hi, y_hi], dim=-1)[:, :, None, :]  # (K, PH*S, 1, 4)
    xi = torch.stack([x_lo, x_hi, x_lo, x_hi], dim=-1)[:, None, :, :]  # (K, 1, PW*S, 4)
    wy = torch.stack([y_w_lo, y_w_lo, y_w_hi, y_w_hi], dim=-1)[:, :, None, :]
    wx = torch.stack([x_w_lo, x_w_hi, x_w_lo, x_w_hi], dim=-1)[:, None, :, :]
    inside = (y_ok[:, :, None] & x_ok[:, None, :])[..., None]  # (K, PH*S, PW*S, 1)
    base = rois[:, 0].long().view(k, 1, 1, 1) * (h * w)
    cols = base + yi * w + xi  # (K, PH*S, PW*S, 4)
    vals = wy * wx * inside / (s * s)
    # (K, PH, S, PW, S, 4) -> (K, PH, PW, S, S, 4): one row per bin, its samples contiguous
    per_row = s * s * 4
    cols = cols.view(k, ph, s, pw, s, 4).permute(0, 1, 3, 2, 4, 5).reshape(-1)
    vals = vals.view(k, ph, s, pw, s, 4).permute(0, 1, 3, 2, 4, 5).reshape(-1)
    crow = torch.arange(0, cols.numel() + 1, per_row, dtype=torch.int64, device=rois.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            crow, cols, vals, size=(k * ph * pw, n * h * w), check_invariants=False
        )


def transposed(a: Tensor) -> Tensor:
    """A^T of a CSR matrix A, as CSR: A's entries reordered by column (stable: by row within it)."""
    rows, cols = a.shape
    crow, col, val = a.crow_indices(), a.col_indices(), a.values()
    # int32 sorts ~1.7x faster; the indices fit (N*H*W < 2**31 for any feature map here)
    key = col.to(torch.int32) if cols < 2**31 else col
    order = torch.sort(key, stable=True).indices
    row = torch.repeat_interleave(torch.arange(rows, device=a.device), crow.diff())
    ccol = torch.zeros(cols + 1, dtype=torch.int64, device=a.device)
    torch.cumsum(torch.bincount(col, minlength=cols), 0, out=ccol[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            ccol, row[order], val[order], size=(cols, rows), check_invariants=False
        )


def _sample_coords(start: Tensor, bin_size: Tensor, bins: int, s: int) -> Tensor:
    """(K,) start and bin size -> (K, bins*S) sampling coordinates along one axis."""
    i = torch.arange(bins * s, dtype=start.dtype, device=start.device)
    within = (i % s + 0.5) / s
    return (
        start[:, None] + (torch.div(i, s, rounding_mode="floor") + within)[None] * bin_size[:, None]
    )


def _bilinear_axis(v: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear_interpolate along one axis: low/high index, their weights, valid."""
    ok = (v >= -1.0) & (v <= size)
    v = v.clamp(min=0.0)
    lo = v.long()  # v >= 0: truncation is the floor, as in the C++ kernel
    top = lo >= size - 1
    lo = torch.where(top, torch.full_like(lo, size - 1), lo)
    hi = torch.where(top, lo, lo + 1)
    v = torch.where(top, lo.to(v.dtype), v)
    frac = v - lo.to(v.dtype)
    return lo, hi, 1.0 - frac, frac, ok


class _SparseRoIAlign(torch.autograd.Function):
    """All levels in one op: forward A_l @ x_l, backward A_l^T @ grad_l (no RoI gradient)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,  # noqa: ANN001
        rois: Tensor,
        output_size: tuple[int, int],
        scales: tuple[float, ...],
        sampling_ratio: int,
        aligned: bool,
        *features: Tensor,
    ) -> Tensor:
        ph, pw = output_size
        k = rois.shape[0]
        c = features[0].shape[1]
        out = features[0].new_zeros(len(features), k, c, ph, pw)
        mats = []
        for level, (x, scale) in enumerate(zip(features, scales)):
            n, _, h, w = x.shape
            a = sampling_matrix(rois, (n, h, w), scale, output_size, sampling_ratio, aligned)
            mats.append(a)
            if k == 0:
                continue
            x_rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # (N, C, H, W) -> (N*H*W, C)
            pooled = torch.mm(a, x_rows)  # (K*PH*PW, C)
            out[level].copy_(pooled.view(k, ph, pw, c).permute(0, 3, 1, 2))
        ctx.mats = mats
        ctx.shapes = [x.shape for x in features]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads: list[Tensor | None] = []
        for level, (a, shape) in enumerate(zip(ctx.mats, ctx.shapes)):
            if not ctx.needs_input_grad[5 + level]:
                grads.append(None)
                continue
            n, c, h, w = shape
            g = grad[level].permute(0, 2, 3, 1).reshape(-1, c)  # (K, C, PH, PW) -> (K*PH*PW, C)
            gx = torch.mm(transposed(a), g) if g.shape[0] else g.new_zeros(n * h * w, c)
            grads.append(gx.view(n, h, w, c).permute(0, 3, 1, 2).contiguous())
        return (None, None, None, None, None, *grads)
