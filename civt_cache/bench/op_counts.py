"""What a GPU would pay for a piece of torch code, counted on any machine: kernel launches,
host-to-device transfers and device reads.

Why count: a GPU runs one small kernel in a few µs, but each launch costs the host ~4-6 µs and
each blocking transfer or read of a device value a full synchronisation, so code whose launches
grow with the batch (a Python loop over samples) is launch-bound however fast the card. These
counts are exact and the same on a CPU as on a GPU (the code is device-agnostic), so a machine
without a GPU can still see whether a path scales.

- launches: ATen ops in ``torch.profiler``'s CPU trace that run a kernel themselves: not one of
  the ops that only make views or allocate, and calling no op that runs one;
- transfers: tensors made from host data (``torch.tensor``/``as_tensor`` of Python or NumPy
  values, indexing with a list or array) and ``to``/``copy_`` from a CPU tensor onto a device
  (counted on a CPU run as the copies it would be on a GPU);
- reads: ``item``, ``tolist``, ``cpu``, ``numpy``, Python scalars and truth values of tensors,
  ``nonzero`` (a boolean-mask index calls it), each a synchronisation on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

#: ATen ops that change metadata or allocate without running a kernel.
NO_KERNEL = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view",
    "aten::as_strided", "aten::expand", "aten::expand_as", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::transpose", "aten::t",
    "aten::reshape", "aten::_reshape_alias", "aten::alias", "aten::detach", "aten::lift_fresh",
    "aten::resize_", "aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::narrow", "aten::view_as", "aten::unflatten", "aten::flatten", "aten::movedim",
    "aten::is_nonzero", "aten::result_type", "aten::_has_compatible_shallow_copy_type",
    "aten::set_", "aten::is_pinned", "aten::_local_scalar_dense", "aten::item",
    "aten::broadcast_tensors", "aten::meshgrid", "aten::numpy_T", "aten::contiguous",
})

_READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero"}
_HOST_DATA = (list, tuple, np.ndarray, int, float, bool)


@dataclass
class OpCounts:
    """Launches, host-to-device transfers and device reads of one run."""
    launches: int
    transfers: int
    reads: int


class _TransferCounter(TorchFunctionMode):
    """Counts the transfers and reads of the code run under it (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.transfers = 0
        self.reads = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
            self.transfers += 1
        elif name in ("__getitem__", "__setitem__", "index_put_") and len(args) > 1 \
                and _has_host_index(args[1]):
            self.transfers += 1
        elif name in ("to", "cuda", "copy_") and _host_to_device(name, args, kwargs):
            self.transfers += 1
        elif name in _READS and args and isinstance(args[0], torch.Tensor):
            self.reads += 1
        return func(*args, **kwargs)


def _has_host_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, np.ndarray)) for p in parts)


def _host_to_device(name: str, args: tuple, kwargs: dict) -> bool:
    """A CPU tensor sent to a named device (on a CPU run: the call that would copy on a GPU)."""
    if name == "copy_":
        return len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].device.type == "cpu" \
            and args[0].device.type != "cpu"
    src = args[0] if args else None
    if not isinstance(src, torch.Tensor) or src.device.type != "cpu":
        return False
    if name == "cuda":
        return True
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            target = a
        elif isinstance(a, torch.Tensor):
            target = a.device
    return target is not None


def count_ops(fn: Callable[[], Any]) -> OpCounts:
    """Run ``fn`` once and count what it would cost a GPU."""
    counter = _TransferCounter()
    with profile(activities=[ProfilerActivity.CPU]) as prof, counter:
        fn()
    launches = sum(1 for e in prof.events()
                   if e.name.startswith("aten::") and e.name not in NO_KERNEL
                   and not any(c.name.startswith("aten::") and c.name not in NO_KERNEL
                               for c in e.cpu_children))
    return OpCounts(launches, counter.transfers, counter.reads)
