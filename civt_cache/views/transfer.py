"""Per-batch numbers sent to the device in one transfer.

Why: every ``torch.as_tensor(host_values, device=...)`` is its own host-to-device copy, and a
blocking one unless its source is pinned; an op stream that makes a dozen of them per batch
waits on the bus a dozen times. The engine gathers every per-sample number a batch needs
(indices, boxes, factors, coefficient tables) here on the host, as NumPy arrays, and sends them
as one int64 buffer, pinned and ``non_blocking`` on a GPU; the device side takes views of it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


class DeviceArrays:
    """Named device tensors, all views of one transferred buffer."""

    def __init__(self, buffer: torch.Tensor, layout: Mapping[str, tuple[int, tuple[int, ...], bool]],
                 host: Mapping[str, np.ndarray]) -> None:
        self._buffer, self._layout, self._host = buffer, layout, host

    def __getitem__(self, name: str) -> torch.Tensor:
        start, shape, is_float = self._layout[name]
        size = int(np.prod(shape))
        part = self._buffer[start:start + size]
        return (part.view(torch.float64) if is_float else part).view(shape)

    def as_sent(self, name: str) -> torch.Tensor:
        """An array in the dtype it had on the host (the buffer holds int64 / float64)."""
        return self[name].to(torch.from_numpy(self._host[name][:0]).dtype)

    def host(self, name: str) -> np.ndarray:
        """The host copy of an array, for sizes the host must know without reading the device."""
        return self._host[name]


def to_device(arrays: Mapping[str, np.ndarray], device: torch.device) -> DeviceArrays:
    """One transfer of ``arrays`` (integer ones as int64, floating ones as float64)."""
    layout: dict[str, tuple[int, tuple[int, ...], bool]] = {}
    host: dict[str, np.ndarray] = {}
    parts, start = [], 0
    for name, a in arrays.items():
        a = host[name] = np.asarray(a)
        is_float = a.dtype.kind == "f"
        flat = np.ascontiguousarray(a, dtype=np.float64 if is_float else np.int64).reshape(-1)
        parts.append(flat.view(np.int64))
        layout[name] = (start, a.shape, is_float)
        start += flat.size
    buffer = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    if device.type == "cuda":
        buffer = buffer.pin_memory()
    return DeviceArrays(buffer.to(device, non_blocking=True), layout, host)
