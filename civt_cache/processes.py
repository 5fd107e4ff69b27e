"""Child processes that never outlive the process that started them: DataLoader workers, and
torchrun's ranks.

Why: a DataLoader worker is a forked child. When its parent is killed (``kill -9``, a node
failure, a scheduler's preemption, torchrun ending a failed group), PyTorch's own check only
runs while the worker waits for work; a worker blocked on a full queue to a dead reader, or busy,
lives on, re-parented to pid 1, holding its memory (0.4-1.3 GB each) and every descriptor it
inherited. Each worker therefore asks the kernel to kill it when its parent dies (Linux
``PR_SET_PDEATHSIG``; elsewhere a thread that polls the parent's pid), and checks that the
parent did not die before it asked. torchrun starts each rank detached from its own signals (a new process group), so a
rank whose torchrun agent is killed (a node's scheduler ending it) would run on alone, waiting
in a collective; a rank asks the same of its agent.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable

from civt_cache.stopping import ignore_stop_signals

_PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Make this process end at once when process ``parent`` (its parent at fork) ends."""
    asked = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            asked = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            asked = False
    if os.getppid() != parent:  # the parent died before the kernel was asked
        os._exit(1)
    if not asked:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="civt-parent-watch").start()


def _init(parent: int, then: Callable[[int], None] | None, worker_id: int) -> None:
    die_with_parent(parent)
    ignore_stop_signals()
    if then is not None:
        then(worker_id)


def worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` for loaders made in this process: the worker dies with
    this process; ``then(worker_id)`` runs after, if given."""
    return functools.partial(_init, os.getpid(), then)
