"""Build the next batch while the current one trains (timm's ``PrefetchLoader`` pattern).

Why: views are built on the training device. Built in series with the step, the device
alternates between building views and training, idle in neither but never both; on a side
CUDA stream the next batch's decode, views and targets run while the step runs on the main
stream. The host side is the same on every device (one batch built ahead, before the current
one is handed over), so the CPU tests exercise the order of work a GPU sees: building a batch
draws nothing from the global RNG the step uses (drop path), so a run gives the same weights
with or without it (tested).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

Item = TypeVar("Item")


def prefetched(items: Iterable[Item], make: Callable[[Item], Any], device: torch.device,
               enabled: bool = True) -> Iterator[Any]:
    """``make(item)`` for each item, in order; with ``enabled``, each is made one item ahead
    (on a side stream on CUDA, which the consumer's stream then waits for)."""
    if not enabled:
        yield from (make(item) for item in items)
        return
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    pending: Any = None
    started = False
    for item in items:
        if stream is None:
            made = make(item)
        else:
            with torch.cuda.stream(stream):
                made = make(item)
        if started:
            yield pending
        if stream is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_stream(stream)
            _record(made, consumer)
        pending, started = made, True
    if started:
        yield pending


def _record(value: Any, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator that ``stream`` uses the tensors in ``value`` (made on another
    stream), so their memory is not reused while it still may."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cuda":
            value.record_stream(stream)
    elif isinstance(value, dict):
        for v in value.values():
            _record(v, stream)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _record(v, stream)
