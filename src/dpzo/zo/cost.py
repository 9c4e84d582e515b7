"""What a piece of code costs, measured op by op on any device: memory, copies and host waits.

Memory is a property of the tensors a program keeps alive, not of the device it runs on, so it
can be measured on the CPU and, under :class:`~torch._subclasses.fake_tensor.FakeTensorMode`,
for models that are never allocated.  :func:`measure` runs a callable under one
``TorchDispatchMode`` (:class:`CostTracker`) that sees every ATen op and records:

* **live tensor bytes per device and their peak**: every storage an op returns is counted from
  then until Python frees it (a storage's Python object lives as long as the storage does, so a
  weakref finalizer sees the free), plus the storages of the tensors and modules named as
  ``alive`` (the weights, the inputs), counted from the start as torch's ``MemTracker`` does;
* **bytes copied** host → device, device → host and device → device (``_to_copy``, ``copy_``
  and ``_copy_from`` whose source and destination devices differ);
* **host synchronisations**: the ops that make the host wait for a device: every read of a
  value (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``), the
  ops whose output shape depends on values (``nonzero``, ``masked_select``, ``unique``), and a
  blocking copy from or to a device.  On the CPU these wait for nothing, but they are exactly
  where the same code waits on a GPU, so counting them on the CPU is counting them on the GPU.
  One exception: ``tolist()`` and ``numpy()`` of a CPU tensor read its memory without any ATen
  op, so on the CPU they are not seen; on a GPU they are, as the blocking copy to the host they
  start.  (A tensor kept on the host on purpose, such as a batch's indices, is read that way.)

Under fake tensors a value cannot be read: :func:`measure` with ``fake=True`` answers every
value read with a placeholder (``True`` for a bool, ``0`` otherwise) so the code runs on; its
memory, copies and waits are the real code's, its numbers are not.

The ratios this module makes measurable are budgets in ``tests/test_cost_budgets.py``; the
bench (``dpzo bench``), every training cell (``cost`` in ``metrics.json``) and ``dpzo plan``
report them.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Cost", "CostTracker", "fake_mode", "is_fake", "measure", "tensors_of"]

T = TypeVar("T")

MiB = 2**20

#: ops whose output shape depends on tensor values: a GPU must finish them before the host
#: can allocate what follows
_SHAPE_FROM_VALUES = ("nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive")


@dataclass
class Cost:
    """What :func:`measure` saw.  Bytes per device key (``"cpu"``, ``"cuda:0"``)."""

    start_bytes: dict[str, int] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    end_bytes: dict[str, int] = field(default_factory=dict)
    host_to_device_bytes: int = 0
    device_to_host_bytes: int = 0
    device_to_device_bytes: int = 0
    host_syncs: int = 0
    #: why each host synchronisation happened (op name -> count)
    sync_ops: Counter = field(default_factory=Counter)

    def peak_mb(self, device: str | torch.device | None = None) -> float:
        """The peak of live bytes on ``device`` (default: the device with the largest peak), MiB."""
        if device is None:
            return max(self.peak_bytes.values(), default=0) / MiB
        return self.peak_bytes.get(_key(torch.device(device)), 0) / MiB

    @property
    def copied_bytes(self) -> int:
        """All bytes that crossed between two devices."""
        return self.host_to_device_bytes + self.device_to_host_bytes + self.device_to_device_bytes

    def per_step(self, device: str | torch.device, steps: int = 1) -> dict[str, float]:
        """The peak on ``device`` (MiB) and, per step of ``steps``, the MiB copied and the host waits."""
        return {
            "peak_mb": round(self.peak_mb(device), 3),
            "copied_mb_per_step": round(self.copied_bytes / MiB / steps, 3),
            "host_syncs_per_step": self.host_syncs / steps,
        }

    def as_dict(self, per: int = 1) -> dict[str, Any]:
        """JSON-ready: peaks per device in MiB; copies (MiB) and syncs divided by ``per`` (steps)."""
        return {
            "peak_mb": {k: round(v / MiB, 3) for k, v in self.peak_bytes.items()},
            "start_mb": {k: round(v / MiB, 3) for k, v in self.start_bytes.items()},
            "host_to_device_mb": round(self.host_to_device_bytes / MiB / per, 3),
            "device_to_host_mb": round(self.device_to_host_bytes / MiB / per, 3),
            "device_to_device_mb": round(self.device_to_device_bytes / MiB / per, 3),
            "host_syncs": self.host_syncs / per,
            "sync_ops": dict(self.sync_ops),
        }


def _key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)


def tensors_of(*items: torch.nn.Module | torch.Tensor | Iterable) -> Iterator[torch.Tensor]:
    """The tensors of modules (parameters and buffers), tensors, and iterables of those."""
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, torch.nn.Module):
            yield from item.parameters()
            yield from item.buffers()
        elif item is not None:
            yield from tensors_of(*item)


class CostTracker(TorchDispatchMode):
    """Live storages per device with their peak, cross-device copies and host waits (module doc).

    ``placeholder_reads``: answer value reads instead of running them (for fake tensors)."""

    def __init__(
        self,
        alive: Iterable[torch.Tensor] = (),
        placeholder_reads: bool = False,
        host: Iterable[torch.Tensor] = (),
    ) -> None:
        super().__init__()
        self.cost = Cost()
        self._live: dict[int, tuple[str, int]] = {}
        self._current: Counter = Counter()
        self._placeholder_reads = placeholder_reads
        # storages that play host memory on a machine whose only device is the CPU (the
        # streamed store's home copies): there the CPU's other storages play the device
        host = list(host)
        self._host = {t.untyped_storage()._cdata for t in host}
        self._cpu_is_device = bool(self._host)
        for t in [*host, *alive]:
            self._track(t)
        self.cost.start_bytes = dict(self._current)

    def _where(self, t: torch.Tensor) -> str:
        if self._cpu_is_device and t.untyped_storage()._cdata in self._host:
            return "host"
        return _key(t.device)

    def _is_host(self, where: str) -> bool:
        return where == "host" or (where == "cpu" and not self._cpu_is_device)

    # -- memory -------------------------------------------------------------------------
    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live or t.device.type == "meta":  # a fake tensor's storage is on meta
            return
        device = self._where(t)
        self._live[key] = (device, storage.nbytes())
        self._current[device] += storage.nbytes()
        if self._current[device] > self.cost.peak_bytes.get(device, 0):
            self.cost.peak_bytes[device] = self._current[device]
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self._host.discard(key)  # the address may be reused by a storage on the device
        device, nbytes = self._live.pop(key, ("", 0))
        if device:
            self._current[device] -= nbytes

    # -- copies and waits ----------------------------------------------------------------
    def _sync(self, why: str) -> None:
        self.cost.host_syncs += 1
        self.cost.sync_ops[why] += 1

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, non_blocking: bool) -> None:
        src_at, dst_at = self._where(src), self._where(dst)
        if src_at == dst_at:
            return
        nbytes = src.numel() * src.element_size()
        from_host, to_host = self._is_host(src_at), self._is_host(dst_at)
        if from_host and not to_host:
            self.cost.host_to_device_bytes += nbytes
        elif to_host and not from_host:
            self.cost.device_to_host_bytes += nbytes
        else:
            self.cost.device_to_device_bytes += nbytes
        # a blocking copy between host and device makes the host wait for the device's stream
        if not non_blocking and from_host != to_host:
            self._sync("blocking copy")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense":
            self._sync("value read")
            if self._placeholder_reads:
                return True if args[0].dtype == torch.bool else 0
        elif name in _SHAPE_FROM_VALUES:
            self._sync(name)
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_", "_copy_from") and isinstance(args[0], torch.Tensor):
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out if name == "_to_copy" else args[1])
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                self._copy(src, dst, bool(kwargs.get("non_blocking", False) or (len(args) > 2 and args[2])))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def finish(self) -> Cost:
        self.cost.end_bytes = {k: v for k, v in self._current.items() if v}
        return self.cost


def fake_mode() -> Any:
    """A fake-tensor mode in which a model can be built (from its config) and run without memory;
    real tensors met inside (an index array, a generator's output) are taken as constants."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor: it has a shape, a dtype and a device but no values."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def measure(
    fn: Callable[[], T],
    *alive: torch.nn.Module | torch.Tensor | Iterable,
    fake: bool = False,
    host: Iterable[torch.Tensor] = (),
) -> tuple[Cost, T]:
    """(what ``fn()`` cost, its result).  The tensors of ``alive`` (modules, tensors, iterables
    of them) count as live from the start, e.g. the weights of the model ``fn`` runs.

    ``host``: tensors that play host memory where the CPU is the only device (a streamed
    store's home copies): copies to and from them count as between host and device, and their
    bytes are kept under the key ``"host"``.

    ``fake=True``: ``fn`` runs on fake tensors, in the fake mode the ``alive`` tensors were made
    in (tensors of another fake mode would be copied into this one, and counted twice), or a
    new one; every value read returns a placeholder."""
    gc.collect()
    alive_tensors = list(tensors_of(*alive))
    tracker = CostTracker(alive_tensors, placeholder_reads=fake, host=list(tensors_of(host)))
    outer = _mode_of(alive_tensors) if fake else contextlib.nullcontext()
    with outer, tracker:
        result = fn()
    return tracker.finish(), result


def _mode_of(tensors: list[torch.Tensor]) -> Any:
    from torch._subclasses.fake_tensor import FakeTensor

    for t in tensors:
        if isinstance(t, FakeTensor):
            return t.fake_mode
    return fake_mode()
