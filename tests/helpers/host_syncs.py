"""Count host syncs on CPU: the calls that make the host wait for a GPU (``HostSyncCounter``).

No GPU is needed: the counter records the *calls* that would sync on one, made anywhere in the
``with`` block, backward included, at three levels:

- ``torch.Tensor.item``, ``.tolist``, ``.numpy`` and ``.cpu`` are wrapped while the block runs
  (they are seen in autograd's backward too, where the Python-level mode below is not active);
- a ``TorchFunctionMode`` sees the other Python-level calls: ``bool()``/``int()``/``float()``
  of a tensor, ``nonzero()`` (``torch.nonzero``, ``argwhere``), ``masked_select``, ``unique``,
  one-argument ``torch.where``, indexing with a bool tensor (``x[mask]``, ``x[mask] = v``,
  ``index_put``), ``repeat_interleave`` without ``output_size``, ``bincount``, and blocking
  copies: ``.to(<cpu>)`` of a device tensor, and ``.cuda()``, ``.to(<cuda device>)`` or
  ``.copy_`` between devices without ``non_blocking=True`` (``.cpu()`` counts always, above:
  on CPU the tensors are all on the host, and a call to it means a copy to the host);
- a ``TorchDispatchMode`` sees the aten ops those lower to (``_local_scalar_dense``,
  ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``, ``equal``,
  ``is_nonzero``, ``index``/``index_put`` with a bool index), which catches them inside C++
  code and autograd's backward as well. An op run inside a call already recorded is not
  counted again.

Each event names the op and the innermost Python frame outside torch and this file
(``path:line``), so a test can keep the events of one package (:meth:`HostSyncCounter.in_code`).

    with HostSyncCounter() as syncs:
        probs, _ = router(hidden)
        probs.sum().backward()
    assert not syncs.events, syncs.describe()
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "SyncEvent"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)

_METHODS = ("item", "tolist", "numpy", "cpu")
_ALWAYS = {
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.argwhere,
    torch.argwhere,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.Tensor.unique,
    torch.unique,
    torch.unique_consecutive,
    torch.Tensor.bincount,
    torch.bincount,
}
_INDEXING = {
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.index_put,
    torch.Tensor.index_put_,
}
_ATEN_SYNCS = (
    "aten._local_scalar_dense",
    "aten.nonzero.",
    "aten.nonzero.default",
    "aten.masked_select",
    "aten._unique",
    "aten.unique",
    "aten.repeat_interleave.Tensor",
    "aten.equal",
    "aten.is_nonzero",
    "aten.bincount",
)
_ATEN_INDEXING = ("aten.index.Tensor", "aten.index_put", "aten._index_put_impl_")


@dataclasses.dataclass(frozen=True)
class SyncEvent:
    """One host-sync call."""

    op: str
    """What was called (``item``, ``__getitem__[bool]``, ``aten.nonzero.default``, ...)."""
    where: str
    """``path:line`` of the innermost Python frame outside torch that made it."""


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _THIS_FILE or path.startswith(_TORCH_DIR):
            continue
        return f"{path}:{frame.lineno}"
    return "?"


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _sync_name(func, args, kwargs) -> str | None:
    """The event's name if ``func(*args, **kwargs)`` syncs the host, else ``None``."""
    if func in _ALWAYS:
        return getattr(func, "__name__", str(func))
    if func in _INDEXING:
        return f"{func.__name__}[bool]" if len(args) > 1 and _has_bool_index(args[1]) else None
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "where(condition)"
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave"
        return None
    non_blocking = bool(kwargs.get("non_blocking", False))
    if func is torch.Tensor.cuda:
        return None if non_blocking or (len(args) > 2 and args[2]) else "cuda"
    if func is torch.Tensor.to:
        device = kwargs.get("device", args[1] if len(args) > 1 else None)
        if isinstance(device, torch.Tensor):
            device = device.device
        if _is_cuda(device) and not non_blocking:
            return "to(cuda)"
        to_cpu = isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"
        if to_cpu and args[0].device.type != "cpu":
            return "to(cpu)"  # from a GPU: always a sync (the host needs the values)
        return None
    if func is torch.Tensor.copy_:
        src = args[1] if len(args) > 1 else kwargs.get("src")
        dst = args[0]
        blocking = not (non_blocking or (len(args) > 2 and args[2]))
        if isinstance(src, torch.Tensor) and src.device != dst.device and blocking:
            return "copy_(across devices)"
    return None


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None if self.counter._inside else _sync_name(func, args, kwargs)
        if name is None:
            return func(*args, **kwargs)
        self.counter.events.append(SyncEvent(name, _caller()))
        self.counter._inside += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._inside -= 1


class _AtenLevel(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self.counter._inside:
            if name.startswith(_ATEN_SYNCS):
                self.counter.events.append(SyncEvent(name, _caller()))
            elif name.startswith(_ATEN_INDEXING) and len(args) > 1 and _has_bool_index(args[1]):
                self.counter.events.append(SyncEvent(f"{name}[bool]", _caller()))
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Records every host-sync call made inside the ``with`` block (module docstring)."""

    def __init__(self) -> None:
        self.events: list[SyncEvent] = []
        self._inside = 0
        self._modes = (_AtenLevel(self), _FunctionLevel(self))
        self._saved: dict[str, Any] = {}

    def _wrap(self, name: str):
        real = getattr(torch.Tensor, name)
        counter = self

        def recorded(tensor, *args, **kwargs):
            if not counter._inside:
                counter.events.append(SyncEvent(name, _caller()))
            counter._inside += 1
            try:
                return real(tensor, *args, **kwargs)
            finally:
                counter._inside -= 1

        return real, recorded

    def __enter__(self) -> HostSyncCounter:
        for name in _METHODS:
            self._saved[name], recorded = self._wrap(name)
            setattr(torch.Tensor, name, recorded)
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        self._saved.clear()

    def in_code(self, fragment: str) -> list[SyncEvent]:
        """The events made from files whose path contains ``fragment`` (e.g. ``megatron_edl``)."""
        return [e for e in self.events if fragment in e.where]

    def describe(self, events: list[SyncEvent] | None = None) -> str:
        """One line per event, for assertion messages."""
        events = self.events if events is None else events
        return "\n".join(f"{e.op} at {e.where}" for e in events) or "no host sync"
