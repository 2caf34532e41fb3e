"""The machine a benchmark ran on, measured in the same run: every benchmark prints this line.

These 2-core hosts differ and drift (the same step can take twice as long an hour later), so a
table is only comparable with the matmul speed measured beside it. Each benchmark calls
`print_machine()` once its thread count is set and puts the returned dict under "machine" in
its last-line JSON.

    python benchmarks/machine.py   # the line alone, and its JSON
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from typing import Any

MATMUL_N = 1024  # square fp32 matmul: large enough for full-speed BLAS, ~10-20 ms a product here


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def matmul_flops(seconds: float = 2.0) -> float:
    """Best fp32 matmul throughput (FLOP/s) over `seconds`, with torch's intra-op threads."""
    import torch

    n = MATMUL_N
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # warm-up: thread pool start, BLAS kernel selection
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def machine_info(seconds: float = 2.0) -> dict[str, Any]:
    """CPU model, cores, torch threads, measured fp32 matmul GFLOP/s, GPU (if any), UTC time.

    Args:
        seconds: how long to measure matmul throughput.

    Returns:
        A JSON-ready dict with keys cpu, cores, threads, matmul_gflops, gpu, date.
    """
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "matmul_gflops": round(matmul_flops(seconds) / 1e9, 1),
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line: `machine: <cpu>, <n> cores, fp32 matmul <g> GFLOP/s on <t> threads, <date>`."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"machine: {info['cpu']}, {info['cores']} cores{gpu}, fp32 matmul "
        f"{info['matmul_gflops']:.1f} GFLOP/s on {info['threads']} threads, {info['date']}"
    )


def print_machine(seconds: float = 2.0) -> dict[str, Any]:
    """Measure the machine, print its line, and return the dict for the last-line JSON."""
    info = machine_info(seconds)
    print(machine_line(info), flush=True)
    return info


if __name__ == "__main__":
    print(json.dumps(print_machine()))
