"""The training loss, read from the device once every few steps instead of every step.

Why: reading a device value (``loss.item()``, ``float(part)``) waits for the step to finish, so
the host can never queue the next batch's views and step while the device works: on a GPU the
whole loop runs in series. Here each step's loss and parts stay on the device; every
``every`` steps (and before any checkpoint or the end of an epoch) one read brings the window
back, checks it is finite, and adds it to the epoch's sums. A non-finite loss is still named
at its own step and batch, only found up to ``every - 1`` steps later; nothing is written in
between (checkpoints read the window first).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from civt_cache.errors import NonFiniteError
from civt_cache.progress import Progress

PARTS = ("ce", "conv", "inv")


class LossWindow:
    """Per-step losses held on the device; ``sums`` holds what has been read, weighted by batch
    size: loss, ce, conv, inv and n. ``describe(value, tag)`` says where a bad step was."""

    def __init__(self, every: int, sums: dict[str, float], describe: Callable[[float, object], str]) -> None:
        self.every, self.sums, self.describe = max(1, every), sums, describe
        self._values: list[torch.Tensor] = []
        self._tags: list[tuple[object, int]] = []
        self.last: float | None = None

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], n: int, tag: object) -> bool:
        """Keep one step's loss; True when the window was read (``last`` is then fresh)."""
        self._values.append(torch.stack([loss.detach(), *(parts[k].detach() for k in PARTS)]))
        self._tags.append((tag, n))
        if len(self._values) >= self.every:
            self.read()
            return True
        return False

    def read(self) -> None:
        """Bring the pending steps back (one device read), refuse a non-finite one, add them up."""
        if not self._values:
            return
        values = torch.stack(self._values).float().cpu().tolist()
        tags, self._values, self._tags = self._tags, [], []
        for (loss, *parts), (tag, n) in zip(values, tags):
            if not math.isfinite(loss):
                raise NonFiniteError(self.describe(loss, tag))
            self.sums["loss"] += loss * n
            for k, v in zip(PARTS, parts):
                self.sums[k] += v * n
            self.sums["n"] += n
            self.last = loss


def bad_batch(value: float, where: tuple[int, int, int, list[int]], manifest: Any) -> str:
    """Where a non-finite loss appeared: the step and the batch's shards and rows."""
    global_step, epoch, step, rows = where
    rows = [int(r) for r in rows]
    shards = sorted({manifest.locate(r)[0] for r in rows})
    files = ", ".join(str(manifest.shard_path(s)) for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
    return (f"loss is {value} at step {global_step} (epoch {epoch + 1}, step {step + 1}) on a batch "
            f"from {files}, rows {rows[:8]}{' ...' if len(rows) > 8 else ''}; stopped, no checkpoint "
            "written after the last good one (check the teachers' cache with `civt-cache verify`, "
            "or lower --lr)")


def show_progress(bar: Progress, window: LossWindow, sums: dict[str, float], tick: float, world_size: int) -> float:
    """After a read of the loss: count the time since ``tick`` and show the loss and rate."""
    now = time.perf_counter()
    sums["seconds"] += now - tick
    if window.last is not None:
        bar.update(0, loss=f"{window.last:.3f}",
                   img_s=f"{sums['n'] * world_size / max(sums['seconds'], 1e-9):.0f}")
    return now
