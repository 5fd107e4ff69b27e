"""Progress that reads well on a terminal and in a log file.

On a terminal a tqdm bar; anywhere else (nohup, SLURM, a pipe) tqdm would print nothing until
the end, so a plain line every ``CIVT_PROGRESS_SECONDS`` seconds (default 30) instead: done of
total, rate (seconds per item under one a second) and ETA. Only the process that owns the run's
output (rank 0) reports, and under torchrun with several ranks it reports in lines, not a bar
redrawn in place, so another rank's line never runs into it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm

#: Seconds between progress lines outside a terminal.
INTERVAL_ENV = "CIVT_PROGRESS_SECONDS"


class Progress:
    """A counter of ``total`` items of ``unit`` named ``desc``, shown as described above."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 leave: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.n, self._first = enabled, initial, initial
        self._bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                          smoothing=0.1) if enabled and sys.stderr.isatty() and not _ranks_share_output() else None)
        self._interval = float(os.environ.get(INTERVAL_ENV, "30"))
        self._start = self._last = time.monotonic()
        self._postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count ``n`` more items; ``postfix`` (e.g. loss) is shown beside the count."""
        self.n += n
        if postfix:
            self._postfix = postfix
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self._interval:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n > self._first:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._last = now
        rate = (self.n - self._first) / max(now - self._start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
        # under one a second, seconds each (as tqdm does): "0.3 steps/s" reads worse than "3.3 s/step"
        speed = (f"{rate:,.1f} {self.unit}/s" if rate >= 1 or rate == 0
                 else f"{1 / rate:,.1f} s/{self.unit.removesuffix('s')}")
        print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} "
              f"({100 * self.n / max(self.total, 1):.0f}%), {speed}, "
              f"ETA {_duration(eta)}{extra}", file=sys.stderr, flush=True)


def _ranks_share_output() -> bool:
    """Under torchrun with several ranks, which write to one terminal: a bar redrawn in place
    (``\r``) would have another rank's line written into it, so lines it is."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
