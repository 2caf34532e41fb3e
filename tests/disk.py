"""A small file system for disk-full tests: a tmpfs the test mounts, fills and grows.

Mounting needs root (or CAP_SYS_ADMIN); where it is not permitted the test is skipped, with the
mount's own error as the reason.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """Mount a tmpfs of `size` bytes (rounded up to pages) at `path`; unmount it on exit."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def grow(path: Path, size: int) -> None:
    """Give a mounted `small_disk` `size` bytes, its files kept (freeing space)."""
    cmd = ["mount", "-o", f"remount,size={size}", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
