"""``civt-cache bench threads``: training speed at the intra-op thread count civt-cache chooses
(the cores left after loader workers, ``distributed.choose_threads``) against one thread and
torch's default (every core), on an idle machine and beside one busy core (a shared node).

Why: loader workers build views on the same cores the training step's threads use; torch's
default then oversubscribes them, and on a busy machine each step waits for its slowest thread.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any, Iterator

from civt_cache.bench.student import train_rate
from civt_cache.stages.train_student import StudentJob


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def busy_core() -> Iterator[None]:
    """Another process spinning on one core for the duration (what a shared node looks like)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def measure_threads(job: StudentJob, steps: int) -> dict[str, Any]:
    """img/s of plain training (labels only: the data path and the step, no cache needed) at each
    thread count, idle and loaded."""
    cores = available_cores()
    chosen = max(1, cores - job.workers)
    counts = {"1 thread": 1, f"civt-cache's choice ({chosen})": chosen, f"torch default ({cores})": cores}
    plain = replace(job, teachers="none", cache=None, online=False)
    rates: dict[str, dict[str, float]] = {}
    for load in ("idle", "one core busy"):
        with busy_core() if load != "idle" else nullcontext():
            rates[load] = {name: train_rate(replace(plain, threads=n), steps) for name, n in counts.items()}
    return {"cores": cores, "workers": job.workers, "model": job.model, "batch_size": job.batch_size,
            "steps": steps, "rates": rates}


def format_threads(r: dict[str, Any]) -> str:
    lines = [f"bench threads: {r['model']}, batch {r['batch_size']}, {r['workers']} loader workers, "
             f"{r['cores']} cores, {r['steps']} timed steps, plain training"]
    for load, rates in r["rates"].items():
        default = list(rates.values())[-1]
        for name, rate in rates.items():
            lines.append(f"  {load:>14}  {name:<28} {rate:8.1f} img/s  {rate / default:5.2f}x torch default")
    return "\n".join(lines)


def bench_threads(job: StudentJob, steps: int) -> str:
    return format_threads(measure_threads(job, steps))
