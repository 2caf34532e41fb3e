"""Normalization layers: a device-agnostic synchronized batch norm and a `make_norm` factory.

PANet's appendix B ("MBN") normalizes every new layer with batch statistics gathered over all
GPUs. `torch.nn.SyncBatchNorm` only runs on CUDA tensors, so CPU runs (gloo) could not use
it; `SyncBatchNorm` here works over any `torch.distributed` process group on whatever device
the input lives on (gloo on CPU, NCCL on GPU) and keeps `nn.BatchNorm2d`'s parameter and
buffer names, so state dicts are interchangeable.

Communication per layer and training step: one `all_reduce` of 2C + 1 values in the forward
pass and one of 2C values in the backward pass. Every rank of the group must take part in
both, also a rank whose local batch is empty (see `SyncBatchNorm`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "make_norm"]

NORM_KINDS = ("none", "bn", "syncbn", "gn", "frozen_bn")
GN_MAX_GROUPS = 32  # Wu & He's default; fewer groups only when the channels do not divide


def _reduce_dims(x: Tensor) -> list[int]:
    """All dims but the channel dim 1: (N, C, *) -> [0, 2, 3, ...]."""
    return [0, *range(2, x.dim())]


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against (N, C, *): (1, C, 1, ...)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs (AMP), float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _local_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of (N, C, *), N > 0, in the compute dtype.

    ATen's batch-norm statistics kernel: on CPU (float64 accumulation) ~5x faster than
    `var_mean` over dims (0, 2, 3); on CUDA the fused Welford kernel, which reads half/bfloat16
    input directly and returns float32 statistics (no float32 copy of the activations).
    Elsewhere `var_mean` on a copy in the compute dtype.
    """
    if x.device.type == "cuda":
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    x = x.to(_compute_dtype(x))
    if x.device.type == "cpu":
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    return mean, var


def _global_batch_stats(x: Tensor, group: ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance over the batches of all ranks in `group`.

    Args:
        x: (N, C, *) local batch; N may be 0.
        group: the process group; None for the default group.

    Returns:
        mean (C,), var (C,) and the global element count per channel (a 0-d tensor), all
        float64 on `x`'s device. With a global count of 0, mean and var are zeros.
    """
    c = x.shape[1]
    n_local = x.numel() // c if c else 0
    if n_local > 0:
        # Two-pass / Welford local statistics (see _local_stats) avoid the cancellation of a
        # naive float32 sum of squares; packing n * mean and n * (var + mean^2) in float64
        # makes the cross-rank combination exact up to float64 rounding.
        mean, var = _local_stats(x)
        mean, var = mean.double(), var.double()
        local_sum, local_sqsum = mean * n_local, (var + mean * mean) * n_local
    else:
        # An empty rank still joins the all_reduce (else the others deadlock), with zeros.
        local_sum = local_sqsum = x.new_zeros(c, dtype=torch.float64)
    count = torch.full((1,), float(n_local), dtype=torch.float64, device=x.device)
    # (2C + 1,) = [sum, sqsum, count]: one collective instead of three.
    packed = torch.cat([local_sum, local_sqsum, count])
    dist.all_reduce(packed, group=group)
    total = packed[2 * c]
    # clamp keeps the all-empty case finite without a host sync to branch on it.
    mean = packed[:c] / total.clamp(min=1)
    var = (packed[c : 2 * c] / total.clamp(min=1) - mean * mean).clamp(min=0)
    return mean, var, total


def _fused(x: Tensor) -> bool:
    """CUDA: ATen's SyncBatchNorm kernels, which keep half/bfloat16 activations as they are."""
    return x.device.type == "cuda"


def _dense(x: Tensor) -> Tensor:
    """`x` in a layout the fused CUDA kernels take (as torch's SyncBatchNorm does)."""
    if x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous(
        memory_format=torch.channels_last_3d
    ):
        return x
    return x.contiguous()


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with given global statistics; the backward all-reduces the input-grad terms.

    On CUDA the passes run the kernels of `torch.nn.SyncBatchNorm` (`batch_norm_elemt`,
    `batch_norm_backward_reduce`, `batch_norm_backward_elemt`): they read half/bfloat16
    activations and accumulate in float32 without a float32 copy of the input or the
    gradient. Elsewhere both passes run ATen's batch-norm kernels in inference form (global
    mean/var as the "running" statistics), plus one elementwise correction in the backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        eps: float,
        count: Tensor,
        group: ProcessGroup | None,
    ) -> Tensor:
        """(N, C, *) -> (N, C, *) in `x`'s dtype; mean/var (C,) in the compute dtype."""
        if _fused(x):
            x = _dense(x)
        if x.numel() == 0:  # ATen's CPU kernels divide by zero on an empty batch
            out = x.clone()
        elif _fused(x):
            out = torch.batch_norm_elemt(x, weight, bias, mean, torch.rsqrt(var + eps), eps)
        else:
            out = torch.batch_norm(
                x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled
            )
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps = eps
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, var, count = ctx.saved_tensors
        if _fused(x):
            return _fused_backward(ctx, grad_out, x, weight, mean, var, count)
        cdt, shape = mean.dtype, _channel_shape(x)
        c = mean.numel()
        invstd = torch.rsqrt(var + ctx.eps)
        # Inference-form backward: dy * weight * invstd, and this rank's sum(dy * xhat) and
        # sum(dy) (zeros for an empty local batch, which still joins the collective).
        if x.numel() == 0:
            grad_local, sum_dy_xhat, sum_dy = (
                torch.zeros_like(x),
                mean.new_zeros(c),
                mean.new_zeros(c),
            )
        else:
            # save_mean/save_invstd given: a device whose kernel reads them (CUDA does for 2-D
            # input) must not meet undefined tensors; the inference-form kernels ignore them.
            grad_local, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out.contiguous(), x, weight, mean, var, mean, invstd, False, ctx.eps,
                [True, True, True],
            )  # fmt: skip
        # Always all-reduce, even when this rank's input needs no grad: skipping it on one
        # rank only (e.g. an empty rank fed a constant tensor) would deadlock the others.
        packed = torch.cat([sum_dy.to(cdt), sum_dy_xhat.to(cdt)])  # (2C,)
        dist.all_reduce(packed, group=ctx.group)
        n = count.clamp(min=1).to(cdt)
        mean_dy, mean_dy_xhat = packed[:c] / n, packed[c:] / n
        scale = invstd if weight is None else invstd * weight.to(cdt)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over all ranks:
            # the local term minus scale * mean_dy minus scale * invstd * mean_dy_xhat * (x - mean)
            grad_x = grad_local.to(cdt)
            grad_x.addcmul_(
                x - mean.view(shape), (scale * invstd * mean_dy_xhat).view(shape), value=-1
            )
            grad_x.sub_((scale * mean_dy).view(shape))
            grad_x = grad_x.to(x.dtype)
        # Parameter grads stay local sums, as in torch's SyncBatchNorm: DDP averages them.
        grad_w = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None  # affine: both
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _fused_backward(
    ctx: Any,
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
) -> tuple[Tensor | None, ...]:
    """The CUDA backward with ATen's SyncBatchNorm kernels; one all-reduce of 2C values."""
    c = mean.numel()
    invstd = torch.rsqrt(var + ctx.eps)
    if x.numel() == 0:
        sum_dy, sum_dy_xmu = mean.new_zeros(c), mean.new_zeros(c)
    else:
        grad_out = _dense(grad_out)
        # This rank's sum(dy) and sum(dy * (x - mean)), accumulated in float32 or wider.
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            grad_out, x, mean, invstd, weight, True, False, False
        )
    # (2C,); every rank joins, also an empty one or one whose input needs no grad.
    packed = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(packed, group=ctx.group)
    grad_x = None
    if ctx.needs_input_grad[0]:
        if x.numel() == 0:
            grad_x = torch.zeros_like(x)
        else:
            w = None if weight is None else weight.to(mean.dtype)
            total = count.to(torch.int32).reshape(1)  # the kernel divides by the sum of counts
            grad_x = torch.batch_norm_backward_elemt(
                grad_out, x, mean, invstd, w, packed[:c], packed[c:], total
            )
    # Parameter grads stay local sums, as in torch's SyncBatchNorm: DDP averages them.
    grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
    grad_b = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None  # affine: both
    return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm with statistics over all ranks of a process group, on any device/backend.

    A drop-in for `torch.nn.SyncBatchNorm` (same constructor) that also runs on CPU with gloo.
    Parameters and buffers are named as in `nn.BatchNorm2d` (weight, bias, running_mean,
    running_var, num_batches_tracked), so state dicts load either way.

    In training mode with a process group of more than one rank, the forward pass normalizes
    with the mean and biased variance of the union of all ranks' batches and updates the
    running statistics with the unbiased variance, exactly as `nn.BatchNorm2d` would on the
    concatenated batch. The input gradient is that of the concatenated batch; weight and bias
    gradients are this rank's local sums (as in torch's SyncBatchNorm; DDP averages them).
    Otherwise (eval mode, no initialized process group, or a single rank) it is exactly
    `nn.BatchNorm{1,2,3}d`, with no communication.

    Collective contract: every rank must call the forward pass and, if any rank does, the
    backward pass of every `SyncBatchNorm` in the same order. A rank with an empty batch
    (N = 0) returns an empty output but still joins both all-reduces with zeros; autograd
    only runs the backward when the output is part of the loss, so keep it there, e.g.
    `loss = loss + out.sum() * 0`. If all ranks are empty, the output is empty and
    running_mean/running_var stay unchanged (num_batches_tracked counts the step, as in
    `nn.BatchNorm2d`). A global count of one element per channel leaves the running
    statistics unchanged too (`nn.BatchNorm2d` raises there; detecting it would need a
    host-device sync per layer).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: running-statistics factor; None for a cumulative average.
        affine: learn a per-channel weight and bias.
        track_running_stats: keep running_mean/running_var for eval.
        process_group: the group to synchronize over; None for the default (world) group.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.

    Shape:
        input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); output the same.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected a 2D to 5D input (N, C, *), got {input.dim()}D input")

    def _sync_world_size(self) -> int:
        """Ranks to synchronize over in this call; 1 means plain batch norm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize `input` (N, C, *) -> (N, C, *), synchronized in training over the group."""
        self._check_input_dim(input)
        if self._sync_world_size() <= 1:
            return super().forward(input)

        # Same bookkeeping as _BatchNorm.forward, so momentum=None averages identically.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)

        with torch.no_grad():
            mean, var, count = _global_batch_stats(input, self.process_group)
            if self.running_mean is not None and self.running_var is not None:
                self._update_running_stats(mean, var, count, factor)
            cdt = _compute_dtype(input)
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            mean.to(cdt),
            var.to(cdt),
            self.eps,
            count,
            self.process_group,
        )

    def _update_running_stats(
        self, mean: Tensor, var: Tensor, count: Tensor, factor: float
    ) -> None:
        """Momentum update with the unbiased variance; skipped when count <= 1 (no host sync)."""
        assert self.running_mean is not None and self.running_var is not None
        valid = count > 1
        unbiased = var * count / (count - 1).clamp(min=1)
        for buf, stat in ((self.running_mean, mean), (self.running_var, unbiased)):
            old = buf.double()
            # nn.BatchNorm's formula and operand order, for bit-close equivalence.
            buf.copy_(torch.where(valid, factor * stat + (1 - factor) * old, old))


def convert_sync_batchnorm(
    module: nn.Module, process_group: ProcessGroup | None = None
) -> nn.Module:
    """Replace every batch norm in `module` with `SyncBatchNorm`, recursively.

    Converts all `_BatchNorm` subclasses (BatchNorm1d/2d/3d, torch's SyncBatchNorm, ours);
    `FrozenBatchNorm2d` and `GroupNorm` are not batch norms and stay. Like
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm`, the new layers reuse the very same
    Parameter and buffer tensors, which keeps requires_grad, device, dtype and the values
    (and an optimizer built before the conversion still points at them), and keep each
    layer's training mode.

    Args:
        module: the model; converted in place where it has children.
        process_group: the group the new layers synchronize over; None for the default group.

    Returns:
        The converted module: `module` itself, or a new `SyncBatchNorm` if `module` is a BN.
    """
    converted = module
    if isinstance(module, _BatchNorm):
        if (
            isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params()
        ):
            raise ValueError(
                "convert_sync_batchnorm: run a forward pass to initialize lazy BN first"
            )
        converted = SyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


def gn_num_groups(num_channels: int) -> int:
    """The largest divisor of `num_channels` that is at most 32 (GroupNorm's group count)."""
    return next(g for g in range(min(GN_MAX_GROUPS, num_channels), 0, -1) if num_channels % g == 0)


def make_norm(kind: str, num_channels: int, dim: int = 2) -> nn.Module | None:
    """A normalization layer by name.

    Args:
        kind: "none" (None), "bn" (`nn.BatchNorm1d/2d/3d` by `dim`), "syncbn" (`SyncBatchNorm`,
            any dim), "gn" (`nn.GroupNorm` with `gn_num_groups(num_channels)` groups) or
            "frozen_bn" (`panet_model.frozen_bn.FrozenBatchNorm2d`, dim 2 only).
        num_channels: C.
        dim: spatial dims of the input: 1 for (N, C) or (N, C, L), 2 for (N, C, H, W),
            3 for (N, C, D, H, W).

    Returns:
        The layer, or None for "none".
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {', '.join(NORM_KINDS)}")
    if dim not in (1, 2, 3):
        raise ValueError(f"make_norm: dim must be 1, 2 or 3, got {dim}")
    if num_channels < 1:
        raise ValueError(f"make_norm: num_channels must be positive, got {num_channels}")
    if kind == "none":
        return None
    if kind == "bn":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](num_channels)
    if kind == "syncbn":
        return SyncBatchNorm(num_channels)
    if kind == "gn":
        return nn.GroupNorm(gn_num_groups(num_channels), num_channels)
    if dim != 2:
        # FrozenBatchNorm2d broadcasts its (1, C, 1, 1) scale: on (N, C) it would silently
        # produce an (1, 1, N, C) tensor.
        raise ValueError(f"make_norm: 'frozen_bn' needs dim=2 (N, C, H, W), got dim={dim}")
    # Imported here: torchvision's import costs about a second, which every process that
    # only needs SyncBatchNorm (e.g. spawned workers) would otherwise pay.
    from panet_model.frozen_bn import FrozenBatchNorm2d

    return FrozenBatchNorm2d(num_channels)
