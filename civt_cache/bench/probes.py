"""What every benchmark measures with: the peak memory of a process tree (DataLoader
workers included) and /dev/shm, and a device sync before reading a clock.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import torch


class PeakMemory:
    """Peak RSS summed over this process and all its descendants (DataLoader workers), and peak
    growth of /dev/shm, sampled every ``interval`` seconds while the ``with`` block runs."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.rss, self.shm = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._shm0 = _shm_used()

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while True:
            self.rss = max(self.rss, _tree_rss(os.getpid()))
            self.shm = max(self.shm, _shm_used() - self._shm0)
            if self._stop.wait(self.interval):
                return


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants, from /proc (0 where /proc is absent)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def _shm_used() -> int:
    """Bytes in use on /dev/shm (0 where there is none)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
