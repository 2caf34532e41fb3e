"""Memory and CPU time of a process tree, read from /proc (Linux), for the benchmarks.

`TreeMemory` samples the summed RSS and PSS of a process and its descendants in a thread and
keeps the peaks; `tree_cpu_seconds` adds up their CPU time.
"""

from __future__ import annotations

import os
import threading

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat.rsplit(")", 1)[1].split()  # comm may hold spaces and parens; fields from state


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant (this kernel has no /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(_stat_fields(name)[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    pids = [root]
    for pid in pids:
        pids.extend(children.get(pid, []))
    return pids


def _rss_pss(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        pss = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0  # the process just ended


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of a process tree, reaped children included."""
    total = 0
    for pid in process_tree(root):
        try:
            f = _stat_fields(pid)
            total += sum(int(v) for v in f[11:15])  # utime, stime, cutime, cstime
        except (OSError, ValueError, IndexError):
            continue
    return total / TICK


class TreeMemory:
    """Samples the summed RSS and PSS of a process tree in a thread; keeps the peaks.

    Also the peak RSS of the root alone and of its descendants together (the pool workers).
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_root_rss = self.peak_children_rss = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [_rss_pss(p) for p in process_tree(self.root)]  # the root first
            self.peak_rss = max(self.peak_rss, sum(s[0] for s in sizes))
            self.peak_root_rss = max(self.peak_root_rss, sizes[0][0])
            self.peak_children_rss = max(self.peak_children_rss, sum(s[0] for s in sizes[1:]))
            self.peak_pss = max(self.peak_pss, sum(s[1] for s in sizes))
            self.max_procs = max(self.max_procs, sum(1 for s in sizes if s[0]))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
