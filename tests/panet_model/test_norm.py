"""Tests for `panet_model.norm`: SyncBatchNorm over real gloo groups against full-batch BN.

The distributed cases run in one pair of spawned processes (world size 2, gloo on
127.0.0.1) for the whole module: each spawn costs seconds of `import torch`, the cases
themselves milliseconds. Every rank saves its results with `torch.save`; the parent
replays the same steps with `nn.BatchNorm` on the concatenated batch and compares.
torchvision is imported inside the tests that need it, so that the spawned ranks, which
import this module, do not pay for it.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from panet_model.norm import SyncBatchNorm, convert_sync_batchnorm, make_norm

WORLD_SIZE = 2
CHANNELS = 3
NUM_STEPS = 2  # two steps check the running-stat recurrence, not only one update
SPAWN_TIMEOUT_S = 120.0  # generous for a loaded 2-core box; a deadlock still fails
GLOO_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Case:
    """One distributed scenario: per-rank batch sizes and the input's trailing dims."""

    sizes: tuple[int, int]  # local batch size of rank 0 and rank 1
    tail: tuple[int, ...]  # dims after (N, C): () for (N, C), (L,), (H, W) or (D, H, W)
    momentum: float | None = 0.1
    dtype: str = "float64"  # input dtype; parameters are float64, or float32 for low precision
    offset: float = 0.5  # added to the inputs: a non-zero mean exercises the variance numerics
    new_group: bool = False  # use an explicit `dist.new_group` instead of the default group
    atol: float = 1e-10  # for outputs and input grads
    stats_atol: float = 1e-10  # for running stats and parameter grads


CASES = {
    "equal_4d": Case(sizes=(4, 4), tail=(5, 6)),
    "unequal_4d_cumulative": Case(sizes=(3, 5), tail=(4, 3), momentum=None, new_group=True),
    "unequal_2d": Case(sizes=(3, 5), tail=()),
    "unequal_3d": Case(sizes=(2, 3), tail=(7,)),
    "unequal_5d": Case(sizes=(1, 2), tail=(2, 3, 2)),
    "one_empty": Case(sizes=(0, 4), tail=(3, 3)),
    "all_empty": Case(sizes=(0, 0), tail=(3, 3)),
    # float32 with |mean| >> std: a naive float32 E[x^2] - E[x]^2 would lose ~6% of the variance.
    "float32_large_mean": Case(
        sizes=(3, 5), tail=(4, 4), dtype="float32", offset=1000.0, atol=1e-4, stats_atol=1e-3
    ),
    # AMP-style bf16 activations: statistics in float32, output and input grad in bf16.
    "bfloat16": Case(sizes=(3, 5), tail=(4, 4), dtype="bfloat16", atol=3e-2, stats_atol=1e-3),
}


# On CUDA also float16, the dtype of activations under fp16 AMP.
CUDA_CASES = {
    **CASES,
    "float16": Case(sizes=(3, 5), tail=(4, 4), dtype="float16", atol=5e-3, stats_atol=1e-3),
}


def _param_dtype(case: Case) -> torch.dtype:
    return torch.float64 if case.dtype == "float64" else torch.float32


def _case_inputs(case: Case, step: int) -> tuple[Tensor, Tensor]:
    """The concatenated batch x (N0 + N1, C, *tail) and a fixed loss weight r of that shape."""
    g = torch.Generator().manual_seed(1000 + step)
    shape = (sum(case.sizes), CHANNELS, *case.tail)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + case.offset).to(
        getattr(torch, case.dtype)
    )
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(getattr(torch, case.dtype))
    return x, r


def _init_state(bn: nn.Module) -> None:
    """Non-trivial weight, bias and running statistics, identical in every process."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(CHANNELS, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(CHANNELS, generator=g, dtype=torch.float64) + 0.5)


def _run_steps(bn: nn.Module, case: Case, rows: slice, device: str = "cpu") -> dict[str, Any]:
    """Train steps on rows `rows` of each step's batch; loss = sum(out * r). Results on CPU."""
    steps = []
    for step in range(NUM_STEPS):
        x_full, r_full = _case_inputs(case, step)
        x = x_full[rows].to(device).clone().requires_grad_()
        bn.zero_grad()
        out = bn(x)
        # An empty rank's output is in the loss too: that is what makes its backward run.
        (out * r_full[rows].to(device)).sum().backward()
        steps.append(
            {
                "out": out.detach().cpu(),
                "grad_x": x.grad.cpu(),
                "grad_w": bn.weight.grad.cpu(),
                "grad_b": bn.bias.grad.cpu(),
            }
        )
    return {"steps": steps, "state": {k: v.cpu() for k, v in bn.state_dict().items()}}


def _sync_worker(rank: int, port: int, out_dir: str, device: str = "cpu") -> None:
    """Spawned process: run every case with SyncBatchNorm on this rank's slice, save results.

    On "cuda" the ranks use NCCL with a GPU each where there are two, else gloo with both ranks
    on cuda:0 (NCCL refuses two ranks on one GPU; gloo all-reduces CUDA tensors through the host).
    """
    torch.set_num_threads(1)  # two processes on a 2-core box
    backend = "gloo"
    if device == "cuda":
        device = "cuda:0"  # set_device needs an index: a bare "cuda" raises ValueError
        if torch.cuda.device_count() >= WORLD_SIZE:
            backend, device = "nccl", f"cuda:{rank}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    try:
        results: dict[str, Any] = {}
        for name, case in (CUDA_CASES if device != "cpu" else CASES).items():
            group = dist.new_group(list(range(WORLD_SIZE))) if case.new_group else None
            bn = SyncBatchNorm(
                CHANNELS, momentum=case.momentum, process_group=group, dtype=_param_dtype(case)
            )
            _init_state(bn)
            start = sum(case.sizes[:rank])
            rows = slice(start, start + case.sizes[rank])
            results[name] = _run_steps(bn.to(device), case, rows, device)
        if device != "cpu":
            results["peak_bytes"] = _cuda_peak_bytes(device)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn: Any, args: tuple, timeout: float) -> None:
    """Run `fn(rank, *args)` in WORLD_SIZE processes; fail (not hang) after `timeout` seconds."""
    context = mp.spawn(fn, args=args, nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"spawned ranks did not finish within {timeout:.0f}s (deadlock?)")


def _cuda_peak_bytes(device: str) -> dict[str, int]:
    """Peak CUDA memory beyond what is live, for a float16 (8, 64, 32, 32) SyncBN step.

    Returns {"input": bytes of the input, "forward": peak extra in the forward pass,
    "backward": peak extra in the backward pass}.
    """
    bn = SyncBatchNorm(64).to(device).train()
    x = torch.randn(8, 64, 32, 32, device=device, dtype=torch.float16).requires_grad_()
    r = torch.randn_like(x)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = bn(x)
    forward = torch.cuda.max_memory_allocated(device) - base
    loss = (out * r).sum()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss.backward()
    backward = torch.cuda.max_memory_allocated(device) - base
    return {"input": x.numel() * x.element_size(), "forward": forward, "backward": backward}


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Per-rank results of all CASES, from one spawn of WORLD_SIZE gloo processes."""
    out_dir = tmp_path_factory.mktemp("syncbn")
    _spawn(_sync_worker, (_free_port(), str(out_dir)), SPAWN_TIMEOUT_S)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def cuda_sync_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Per-rank results of all CUDA_CASES on CUDA (NCCL on 2 GPUs, else gloo on one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out_dir = tmp_path_factory.mktemp("syncbn-cuda")
    _spawn(_sync_worker, (_free_port(), str(out_dir), "cuda"), SPAWN_TIMEOUT_S)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _reference_bn(case: Case) -> nn.Module:
    """nn.BatchNorm{1,2,3}d in float64 with the same initial state as the workers."""
    bn_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    bn = bn_cls[len(case.tail)](CHANNELS, momentum=case.momentum, dtype=torch.float64)
    _init_state(bn)
    return bn


def _reference(case: Case) -> dict[str, Any]:
    """Full-batch BN results, computed in float64 from the (possibly low-precision) inputs."""
    bn = _reference_bn(case).train()
    steps = []
    for step in range(NUM_STEPS):
        x_full, r_full = _case_inputs(case, step)
        x = x_full.double().requires_grad_()
        bn.zero_grad()
        out = bn(x)
        (out * r_full.double()).sum().backward()
        grads = {"grad_x": x.grad, "grad_w": bn.weight.grad.clone(), "grad_b": bn.bias.grad.clone()}
        steps.append({"out": out.detach(), **grads})
    return {"steps": steps, "state": bn.state_dict()}


def _close(actual: Tensor, expected: Tensor, atol: float) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol)


@pytest.mark.parametrize("name", list(CASES))
def test_sync_bn_matches_full_batch_bn(sync_results: list[dict[str, Any]], name: str) -> None:
    _check_against_full_batch(sync_results, CASES[name], name)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_sync_bn_matches_full_batch_bn(
    cuda_sync_results: list[dict[str, Any]], name: str
) -> None:
    """The fused CUDA path, (N, C) input included (the fc norms of the box head)."""
    _check_against_full_batch(cuda_sync_results, CUDA_CASES[name], name)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_sync_bn_matches_cpu_path(
    cuda_sync_results: list[dict[str, Any]], sync_results: list[dict[str, Any]], name: str
) -> None:
    case = CASES[name]
    for cuda_rank, cpu_rank in zip(cuda_sync_results, sync_results):
        for got, expected in zip(cuda_rank[name]["steps"], cpu_rank[name]["steps"]):
            for key in ("out", "grad_x", "grad_w", "grad_b"):
                _close(got[key], expected[key], max(case.atol, case.stats_atol))
        for key in ("running_mean", "running_var"):
            _close(cuda_rank[name]["state"][key], cpu_rank[name]["state"][key], case.stats_atol)


@pytest.mark.cuda
def test_cuda_sync_bn_float16_needs_no_float32_activations(
    cuda_sync_results: list[dict[str, Any]],
) -> None:
    """Under fp16 AMP, a pass allocates about one activation-sized float16 tensor, no float32."""
    for res in cuda_sync_results:
        peak = res["peak_bytes"]
        # forward: the output (1x); backward: dy of the loss and the input grad (2x). A float32
        # copy of the input or of the gradient alone would be 2x.
        assert peak["forward"] < 1.5 * peak["input"], peak
        assert peak["backward"] < 3.5 * peak["input"], peak


def _check_against_full_batch(sync_results: list[dict[str, Any]], case: Case, name: str) -> None:
    ref = _reference(case)
    per_rank = [sync_results[r][name] for r in range(WORLD_SIZE)]
    bounds = [0, case.sizes[0], sum(case.sizes)]
    for step, ref_step in enumerate(ref["steps"]):
        for rank, res in enumerate(per_rank):
            got, rows = res["steps"][step], slice(bounds[rank], bounds[rank + 1])
            assert got["out"].dtype == getattr(torch, case.dtype)
            assert got["grad_x"].dtype == getattr(torch, case.dtype)
            assert got["out"].shape == ref_step["out"][rows].shape
            _close(got["out"], ref_step["out"][rows], case.atol)
            _close(got["grad_x"], ref_step["grad_x"][rows], case.atol)
        # Parameter grads are local sums (DDP averages them): their sum is the full-batch grad.
        for key in ("grad_w", "grad_b"):
            total = sum(res["steps"][step][key].double() for res in per_rank)
            _close(total, ref_step[key], case.stats_atol)
    for res in per_rank:
        assert res["state"].keys() == ref["state"].keys()
        for key in ("running_mean", "running_var"):
            _close(res["state"][key], ref["state"][key], case.stats_atol)
        assert int(res["state"]["num_batches_tracked"]) == NUM_STEPS
        assert int(ref["state"]["num_batches_tracked"]) == NUM_STEPS


def test_empty_rank_gets_stats_of_the_others(sync_results: list[dict[str, Any]]) -> None:
    """Rank 0 has 0 samples, rank 1 has 4: no deadlock, rank 1 is BN over its own samples."""
    case = CASES["one_empty"]
    empty, full = (sync_results[r]["one_empty"] for r in range(WORLD_SIZE))
    bn = _reference_bn(case).train()
    for step in range(NUM_STEPS):
        x, r = _case_inputs(case, step)
        x = x[case.sizes[0] :].requires_grad_()
        bn.zero_grad()
        out = bn(x)
        (out * r[case.sizes[0] :]).sum().backward()
        assert empty["steps"][step]["out"].shape == (0, CHANNELS, *case.tail)
        assert empty["steps"][step]["grad_x"].shape == (0, CHANNELS, *case.tail)
        _close(empty["steps"][step]["grad_w"], torch.zeros(CHANNELS), 0)
        _close(full["steps"][step]["out"], out.detach(), case.atol)
        _close(full["steps"][step]["grad_x"], x.grad, case.atol)
        _close(full["steps"][step]["grad_w"], bn.weight.grad, case.stats_atol)
        assert full["steps"][step]["grad_w"].abs().sum() > 0  # grads flow on the non-empty rank
    for res in (empty, full):
        _close(res["state"]["running_mean"], bn.running_mean, case.stats_atol)
        _close(res["state"]["running_var"], bn.running_var, case.stats_atol)


def test_all_empty_leaves_running_stats(sync_results: list[dict[str, Any]]) -> None:
    initial = _reference_bn(CASES["all_empty"]).state_dict()
    for rank in range(WORLD_SIZE):
        res = sync_results[rank]["all_empty"]
        assert res["steps"][-1]["out"].numel() == 0
        for key in ("running_mean", "running_var"):
            _close(res["state"][key], initial[key], 0)


# Single process: no process group is initialized in the pytest process, so SyncBatchNorm
# must be plain batch norm, bit for bit.


@pytest.mark.parametrize(
    ("tail", "bn_cls", "momentum"),
    [
        ((5, 4), nn.BatchNorm2d, 0.1),
        ((5, 4), nn.BatchNorm2d, None),
        ((), nn.BatchNorm1d, 0.1),
        ((6,), nn.BatchNorm1d, 0.1),
        ((2, 3, 2), nn.BatchNorm3d, 0.1),
    ],
)
def test_single_process_is_batchnorm(
    tail: tuple[int, ...], bn_cls: type[nn.Module], momentum: float | None
) -> None:
    assert not dist.is_initialized()
    ours = SyncBatchNorm(CHANNELS, momentum=momentum, dtype=torch.float64)
    ref = bn_cls(CHANNELS, momentum=momentum, dtype=torch.float64)
    _init_state(ours)
    _init_state(ref)
    g = torch.Generator().manual_seed(0)
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x = torch.randn(4, CHANNELS, *tail, generator=g, dtype=torch.float64) + 1
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((ours, ref), xs)]
        for out in outs:
            out.pow(2).sum().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=0)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)


def test_single_process_empty_batch() -> None:
    bn = SyncBatchNorm(CHANNELS).train()
    _init_state(bn)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.zeros(0, CHANNELS, 4, 4, requires_grad=True)
    out = bn(x)
    out.sum().backward()
    assert out.shape == x.shape
    assert x.grad.shape == x.shape
    torch.testing.assert_close(bn.running_mean, before["running_mean"])
    torch.testing.assert_close(bn.running_var, before["running_var"])


def test_state_dict_interchangeable_with_batchnorm2d() -> None:
    ref = nn.BatchNorm2d(CHANNELS)
    _init_state(ref)
    ours = SyncBatchNorm(CHANNELS)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    nn.BatchNorm2d(CHANNELS).load_state_dict(ours.state_dict())


@pytest.mark.parametrize("shape", [(4,), (1, 3, 1, 1, 1, 1)])
def test_rejects_bad_input_dims(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2D to 5D"):
        SyncBatchNorm(shape[0] if len(shape) == 1 else 3)(torch.zeros(shape))


class _Net(nn.Module):
    """Every norm kind, nested, with a BatchNorm1d after an fc."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d

        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            FrozenBatchNorm2d(8),
            nn.GroupNorm(4, 8),
            nn.SyncBatchNorm(8),  # torch's own, converted too
        )
        self.fc = nn.Linear(8, 5)
        self.fc_norm = nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, 5)."""
        return self.fc_norm(self.fc(self.body(x).mean(dim=(2, 3))))


def test_convert_sync_batchnorm() -> None:
    torch.manual_seed(0)
    model = _Net().double()
    model.body[1].weight.requires_grad_(False)
    with torch.no_grad():
        model.body[3].running_mean.normal_()  # FrozenBatchNorm2d: buffers only
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias, m.running_mean):
                    t.normal_()
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(3)
    model.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen, gn = model.body[3], model.body[4]
    model.fc_norm.train()  # per-layer training mode is kept

    converted = convert_sync_batchnorm(model)

    for name in ("body.1", "body.5", "fc_norm"):
        layer = converted.get_submodule(name)
        assert type(layer) is SyncBatchNorm
        assert layer.weight.dtype == torch.float64
    assert converted.get_submodule("body.3") is frozen
    assert converted.get_submodule("body.4") is gn
    assert not converted.body[1].weight.requires_grad
    assert converted.body[5].weight.requires_grad
    assert converted.fc_norm.training
    assert not converted.body[1].training
    assert list(converted.state_dict()) == list(state)
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    converted.eval()
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


def test_convert_replaces_a_root_batchnorm() -> None:
    bn = nn.BatchNorm1d(4, eps=1e-3, momentum=None, affine=False)
    converted = convert_sync_batchnorm(bn)
    assert type(converted) is SyncBatchNorm
    assert (converted.eps, converted.momentum, converted.affine) == (1e-3, None, False)
    assert list(converted.state_dict()) == list(bn.state_dict())


@pytest.mark.parametrize(
    ("kind", "channels", "dim", "expected_type"),
    [
        ("bn", 16, 2, nn.BatchNorm2d),
        ("bn", 16, 1, nn.BatchNorm1d),
        ("syncbn", 16, 2, SyncBatchNorm),
        ("syncbn", 16, 1, SyncBatchNorm),
        ("gn", 256, 2, nn.GroupNorm),
        ("frozen_bn", 16, 2, "FrozenBatchNorm2d"),  # resolved below: torchvision imports late
    ],
)
def test_make_norm(
    kind: str, channels: int, dim: int, expected_type: type[nn.Module] | str
) -> None:
    from panet_model import frozen_bn

    if isinstance(expected_type, str):
        expected_type = getattr(frozen_bn, expected_type)
    norm = make_norm(kind, channels, dim=dim)
    assert type(norm) is expected_type
    x = torch.randn(2, channels, *(3,) * dim) if dim == 2 else torch.randn(2, channels)
    assert norm(x).shape == x.shape


def test_make_norm_none() -> None:
    assert make_norm("none", 16) is None


@pytest.mark.parametrize(("channels", "groups"), [(256, 32), (64, 32), (48, 24), (8, 8), (7, 7)])
def test_make_norm_gn_groups(channels: int, groups: int) -> None:
    norm = make_norm("gn", channels)
    assert isinstance(norm, nn.GroupNorm)
    assert norm.num_groups == groups


def test_make_norm_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'batchnorm'.*none, bn, syncbn, gn, frozen_bn"):
        make_norm("batchnorm", 16)


def test_make_norm_rejects_frozen_bn_for_fc() -> None:
    with pytest.raises(ValueError, match="frozen_bn"):
        make_norm("frozen_bn", 16, dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_bn_keeps_the_amp_dtype(dtype: torch.dtype) -> None:
    """float32 input: torchvision's FrozenBatchNorm2d bit for bit; half input stays half."""
    from torchvision import ops

    from panet_model.frozen_bn import FrozenBatchNorm2d

    theirs = ops.FrozenBatchNorm2d(8)
    g = torch.Generator().manual_seed(0)
    for buf in (theirs.weight, theirs.bias, theirs.running_mean):
        buf.copy_(torch.randn(8, generator=g))
    theirs.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    ours = FrozenBatchNorm2d(8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 8, 5, 5, generator=g)
    assert torch.equal(ours(x), theirs(x))
    low = x.to(dtype)
    assert theirs(low).dtype == torch.float32  # what the trunk's activations became under AMP
    assert ours(low).dtype == dtype
    torch.testing.assert_close(ours(low).float(), theirs(low), rtol=2e-2, atol=2e-2)


def test_frozen_bn_trunk_stays_bfloat16_under_autocast() -> None:
    """Under bf16 AMP every frozen norm of the trunk hands the next layer bfloat16."""
    from panet_model import PANetConfig
    from panet_model.build import build_backbone
    from panet_model.frozen_bn import FrozenBatchNorm2d

    cfg = PANetConfig.preset("tiny").override({"backbone.norm": "frozen_bn"})
    trunk = build_backbone(cfg).body
    dtypes = []
    for m in trunk.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trunk(torch.rand(1, 3, 64, 64))
    assert len(dtypes) > 10 and set(dtypes) == {torch.bfloat16}
