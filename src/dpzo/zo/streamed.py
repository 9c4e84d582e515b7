"""Streamed zeroth-order training: the blocks live in host memory, each uploaded once per step.

Zeroth-order training needs forward passes only, so the model never has to be on the compute
device all at once (ZO2, arXiv 2503.12668).  :class:`StreamedParameters` keeps the model's body
(its list of transformer blocks: OPT/Llama/Qwen2/Mistral decoder layers, GPT-2 blocks,
RoBERTa/BERT encoder layers, found as the ``ModuleList`` holding most of the parameters) in
host memory and everything else (embeddings, final norm, head) resident on the device.

One step with P directions, each with its own batch B_p, is one forward pass over the rows
``[B_1, B_1, B_2, B_2, ...]``: *groups* of rows, the first copy of B_p to be computed at
theta + beta z_p, the second at theta - beta z_p.  Every module that holds trainable weights
runs once per group on that group's rows, with its weights perturbed for the group
(:meth:`StreamedParameters._grouped`):

* a block, when the forward reaches it, is uploaded (theta, or its master copy, and its frozen
  weights), gets the previous step's update (z regenerated from its seed at the block's global
  flat indices, the pull toward the anchor), runs its 2P groups, and goes back to host memory;
* the resident modules (embeddings, head) run their groups the same way, without moving.

The released scalars of a step exist only after the last block, so the update of step t is
applied to a block at its upload in step t + 1; :meth:`restore` flushes what is pending
(stage boundaries, evaluation points, snapshots, the end).  Each block is thus uploaded once per
step, and once more per flush.

The parts of the flat vector are those of :class:`~dpzo.zo.placed.PlacedParameters` (one
:class:`~dpzo.zo.flat.FlatParameters` per run of consecutive parameters of a block, or of the
resident modules), each drawing exactly its coordinates of z(seed): the trajectory equals the
resident trainer's (``tests/test_streamed.py``: float64, to 1e-12).  The sampler draws every
batch of a step before any noise (``dpzo.zo.step``), as the resident trainer does.

Host memory holds each block in one arena (:func:`host_arena`: theta in the master's
precision, the frozen weights and buffers; page-locked in place when the device is a GPU), and
with lambda > 0 each block's piece of the stage's anchor, copied there once per anchor; with a
master copy the block's 16-bit working weights exist only while it is uploaded.  The copies
(:class:`BlockCopies`) run on their own CUDA streams: block 0 is fetched when the step starts,
block i + 1 while block i computes, and theta goes home (only when it changed: an evaluation
copies nothing home) while the next blocks compute; the host waits for the copies home only
before it reads host memory (:meth:`StreamedParameters.restore`, a snapshot, a log window),
never per block.  The losses are computed without autograd.  Device memory holds the resident
modules, at most three blocks (the one computing, the next, the previous one until its copy
home is done) and the activations of the 2P groups (``tests/test_cost_streamed.py`` measures
these budgets on the CPU).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dpzo.zo.flat import FlatParameters, trainable_parameters
from dpzo.zo.passes import Coefficient
from dpzo.zo.placed import PlacedParameters, move_part, pull_part


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's body: the ``ModuleList`` holding the most parameters (its transformer blocks)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    if best is None or not any(True for _ in best.parameters()):
        raise NotImplementedError(
            f"{type(model).__name__} has no list of blocks holding most of its weights: it cannot be streamed "
            "(offload: streamed serves OPT, GPT-2, Llama, Qwen2, Mistral, RoBERTa and BERT)"
        )
    return best


def _is_batch(t: torch.Tensor, total: int) -> bool:
    """A tensor of the step's rows: [total, ...] with at least a sequence dimension (hidden states,
    token ids, masks).  1-D tensors are positions (``cache_position``), whose length may equal
    the number of rows by chance."""
    return t.dim() >= 2 and t.shape[0] == total


def _take(value: Any, rows: slice, total: int) -> Any:
    """``value`` with every tensor of the step's rows (:func:`_is_batch`) cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if _is_batch(value, total) else value
    if isinstance(value, tuple | list):
        return type(value)(_take(v, rows, total) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, rows, total) for k, v in value.items()}
    return value


def _has_batch(value: Any, total: int) -> bool:
    if isinstance(value, torch.Tensor):
        return _is_batch(value, total)
    if isinstance(value, tuple | list):
        return any(_has_batch(v, total) for v in value)
    if isinstance(value, dict):
        return any(_has_batch(v, total) for v in value.values())
    return False


def _join(outputs: list[Any], sizes: list[int], *, broadcast: bool = False) -> Any:
    """The groups' outputs put back together along the batch (other values: the first group's).

    ``broadcast``: the module saw no rows (e.g. GPT-2's position embedding of [1, L] positions),
    so each group's [1, ...] output is repeated for the group's rows: a sum with the batch then
    adds to each row its own group's value."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if broadcast:
            if first.dim() < 2 or any(o.shape[0] != 1 for o in outputs):
                raise RuntimeError(
                    "streamed forward: a module that holds trained weights was called without the step's rows and "
                    "returned no [1, ...] tensor to broadcast; offload: streamed needs one forward per step over "
                    "the whole batch"
                )
            return torch.cat([o.expand(n, *o.shape[1:]) for o, n in zip(outputs, sizes)])
        if first.dim() >= 2 and all(o.shape[0] == n for o, n in zip(outputs, sizes)):
            return torch.cat(outputs)
        return first
    if isinstance(first, tuple | list):
        return type(first)(_join([o[k] for o in outputs], sizes, broadcast=broadcast) for k in range(len(first)))
    return first


@dataclass
class _Pending:
    """A move of a block's part waiting for the block's next upload: along directions
    (``moves``), or toward the anchor (``host``: the part's piece of it in host memory, uploaded
    with the block; ``weight``)."""

    part: FlatParameters
    moves: Sequence[tuple[int, Coefficient]] = ()
    host: torch.Tensor | None = None
    weight: float = 0.0

    def apply(self, anchors: dict[int, torch.Tensor]) -> None:
        """The move, with ``anchors`` the device copies of the uploaded pieces (by host piece id)."""
        if self.host is None:
            move_part(self.part, self.moves)
        else:
            pull_part(self.part, anchors.get(id(self.host), self.host), self.weight)


#: the byte alignment of each tensor in a block's host arena (a cache line, and a multiple of
#: every element size, so that each slice can be viewed in its dtype)
ARENA_ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ARENA_ALIGN) * ARENA_ALIGN


def host_arena(tensors: Sequence[torch.Tensor], *, pinned: bool) -> list[torch.Tensor]:
    """Copies of ``tensors`` (contiguous, same shapes and dtypes) as views into one host buffer.

    ``pinned`` (where a GPU is; a CPU build of torch has no pinned memory): the buffer is
    page-locked where it lies (:func:`page_lock`).  ``pin_memory`` would round each allocation
    up to a power of two (pytorch issue 150517: a 1.2 GB block pinned as 2 GB, and each tensor
    of a block pinned alone is rounded alike); one arena per block, not one for the model, so
    that building the store never holds the model twice in host memory."""
    sizes = [_aligned(t.numel() * t.element_size()) for t in tensors]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8)
    if pinned and torch.cuda.is_available() and buffer.numel():
        page_lock(buffer)
    views, start = [], 0
    for t, size in zip(tensors, sizes):
        nbytes = t.numel() * t.element_size()
        view = buffer[start : start + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        views.append(view)
        start += size
    return views


def page_lock(buffer: torch.Tensor) -> None:
    """Pin ``buffer``'s memory in place (``cudaHostRegister``, exactly its size), unpinned when
    its storage is freed.  CUDA only: not verifiable without a GPU (docs/large-models.md)."""
    cudart = torch.cuda.cudart()
    storage = buffer.untyped_storage()
    error = int(cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0))
    if error:
        raise RuntimeError(f"cudaHostRegister of a {storage.nbytes()}-byte block arena failed (cudaError {error})")
    # unpinned with the storage, and never after the CUDA context is gone at exit
    weakref.finalize(storage, cudart.cudaHostUnregister, storage.data_ptr()).atexit = False


class BlockCopies:
    """The copies between host memory and the device, and the waits they need.

    On a GPU (the only CUDA code of this module, kept here): uploads run on an *up* stream and
    copies home on a *home* stream, so that both overlap the compute and each other.  The compute
    stream waits for an upload by the event recorded after it (:meth:`use`); a copy home first
    waits for the compute that wrote the block, and records an event that the block's next upload
    waits on (it reads the host memory the copy home writes).  The host waits only before it reads
    or writes host memory itself (:meth:`settle`: snapshots, log windows, loading), never per block.

    Elsewhere (the CPU) every copy is done when it returns: the streams are absent and every wait
    is a no-op.  The counters are kept on every device, at the same points: ``host_waits`` (the
    host blocked on a copy), ``fetches`` and ``copies_home`` (per block).
    """

    def __init__(self, device: torch.device, blocks: int):
        self.device = device
        cuda = device.type == "cuda"
        self._up = torch.cuda.Stream(device) if cuda else None
        self._home = torch.cuda.Stream(device) if cuda else None
        self._home_done: list[Any] = [None] * blocks
        self._unsettled = False  # a copy home the host has not waited for
        self.host_waits = 0
        self.fetches = [0] * blocks
        self.copies_home = [0] * blocks

    def upload(self, i: int, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Start copying ``tensors`` (host) to the device for block ``i``: (their device copies, the
        event the compute stream waits on before using them; None off a GPU)."""
        self.fetches[i] += 1
        if self._up is None:
            return [t.to(self.device, copy=True, non_blocking=True) for t in tensors], None
        with torch.cuda.stream(self._up):
            if self._home_done[i] is not None:  # the host copy of block i is written first
                self._up.wait_event(self._home_done[i])
            moved = [t.to(self.device, copy=True, non_blocking=True) for t in tensors]
            return moved, self._up.record_event()

    def use(self, done: Any, tensors: Sequence[torch.Tensor]) -> None:
        """The compute stream waits for the upload ``done`` (no host wait) and owns its tensors."""
        if done is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for t in tensors:  # made on the up stream, used and freed on the compute stream
            t.record_stream(compute)

    def home(self, i: int, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each (host, device) pair's device tensor home, after the compute queued so far."""
        self.copies_home[i] += 1
        self._unsettled = True
        if self._home is None:
            for host, moved in pairs:
                host.copy_(moved, non_blocking=True)
            return
        self._home.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._home):
            for host, moved in pairs:
                host.copy_(moved, non_blocking=True)
                moved.record_stream(self._home)  # freed by the compute stream after this copy
            self._home_done[i] = self._home.record_event()

    def settle(self) -> None:
        """The host waits for every copy home (before it reads or writes host memory)."""
        if not self._unsettled:
            return
        if self._home is not None:
            self._home.synchronize()
        self.host_waits += 1
        self._unsettled = False


class StreamedParameters:
    """The trainable vector of a model whose blocks are streamed from host memory (module docstring).

    Builds the parts (a :class:`~dpzo.zo.placed.PlacedParameters`, ``placed``), moves the
    resident modules to ``device``, sends the blocks to host memory (one arena per block,
    :func:`host_arena`) and routes the forward of every block and of every resident module that
    holds trainable weights through :meth:`_grouped`.  ``uploads[i]`` counts the uploads of
    block i; ``copies`` (:class:`BlockCopies`) the copies and the host waits.  A store of theta
    (``dpzo.zo.store.ParameterStore``) that is never perturbed as a whole: its two-point losses
    come from one grouped forward.
    """

    def __init__(
        self,
        model: nn.Module,
        master_dtype: torch.dtype | None = torch.float32,
        *,
        device: str | torch.device,
        direction_cache_size: int = 1,
    ):
        device = torch.device(device)
        self.blocks = list(find_blocks(model))
        # A block runs once per group: a key/value cache would collect every group's keys.
        # (Generation passes use_cache itself and runs ungrouped.)
        model.config.use_cache = False
        in_block = {id(t): i for i, b in enumerate(self.blocks) for t in (*b.parameters(), *b.buffers())}
        for m in model.modules():  # everything outside the blocks lives on the device
            for p in m.parameters(recurse=False):
                if id(p) not in in_block:
                    p.data = p.data.to(device)
            for name, b in m.named_buffers(recurse=False):
                if id(b) not in in_block:
                    m._buffers[name] = b.to(device)
        runs: list[list[tuple[str, nn.Parameter]]] = []
        units: list[int] = []  # the block of each run, -1: resident
        for name, p in trainable_parameters(model):
            unit = in_block.get(id(p), -1)
            if runs and units[-1] == unit:
                runs[-1].append((name, p))
            else:
                runs.append([(name, p)])
                units.append(unit)
        self.placed = PlacedParameters(runs, master_dtype, direction_cache_size=direction_cache_size)
        self.numel = self.placed.numel
        self.device = device
        parts = self.placed.parts
        self._home = {id(part): unit for part, unit in zip(parts, units) if unit >= 0}
        self._block_parts = [[p for p, u in zip(parts, units) if u == i] for i in range(len(self.blocks))]
        self._host_master: dict[int, torch.Tensor] = {}
        trainable = {id(p) for part in parts for _, p in part.params}
        self._frozen = [self._send_home(i, trainable) for i in range(len(self.blocks))]
        self._pending: list[list[_Pending]] = [[] for _ in self.blocks]
        self._uploaded = [False] * len(self.blocks)
        self._dirty = [False] * len(self.blocks)  # theta on the device differs from its host copy
        self._fetched: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], dict[int, torch.Tensor], Any]] = {}
        self._anchor: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None  # its pieces in host memory
        self._snapshot: weakref.ref | None = None  # the last snapshot (pinned): an anchor used as it is
        self.copies = BlockCopies(device, len(self.blocks))
        self.uploads = [0] * len(self.blocks)
        self._groups: list[tuple[int, int, float]] | None = None
        self._route(model)

    # -- residency -------------------------------------------------------------------------
    @torch.no_grad()
    def _send_home(self, i: int, trainable: set[int]) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
        """Block i into its host arena: theta of its parts and its frozen weights and buffers;
        returns (owner, name, is a parameter, its host copy) of the frozen ones."""
        frozen = []
        for m in self.blocks[i].modules():
            for name, p in m.named_parameters(recurse=False):
                if id(p) not in trainable:
                    frozen.append((m, name, True, p.data))
            for name, b in m.named_buffers(recurse=False):
                frozen.append((m, name, False, b))
        parts = self._block_parts[i]
        hosts = host_arena([p.master for p in parts] + [t for *_, t in frozen], pinned=self.device.type == "cuda")
        for part, host in zip(parts, hosts):
            part.restore()
            self._host_master[id(part)] = host
            self._rebind_home(part)
        frozen = [(m, name, is_param, host) for (m, name, is_param, _), host in zip(frozen, hosts[len(parts) :])]
        self._frozen_home(frozen)
        return frozen

    def _rebind_home(self, part: FlatParameters) -> None:
        """theta of ``part`` in its host copy; with a master copy the working weights exist only
        on the device: between uploads the parameters view a zero-stride placeholder (no memory)."""
        host = self._host_master[id(part)]
        work = host if part.in_place else torch.zeros(1, dtype=part.work_dtype).expand(part.numel)
        part.rebind(work, host)

    @staticmethod
    def _frozen_home(frozen: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
        for owner, name, is_param, host in frozen:
            if is_param:
                owner._parameters[name].data = host
            else:
                owner._buffers[name] = host

    def host_tensors(self) -> list[torch.Tensor]:
        """What this store holds in host memory: the blocks' arenas and the anchor's pieces (the
        tensors that play host memory in a cost measurement on the CPU, ``dpzo.zo.cost``)."""
        out = [*self._host_master.values(), *(host for frozen in self._frozen for *_, host in frozen)]
        return out + ([] if self._anchor is None else list(self._anchor[1].values()))

    @torch.no_grad()
    def _fetch(self, i: int) -> None:
        """Start copying block i to the device (and the anchor pieces its pending pulls need), on
        the up stream on a GPU, so that it overlaps the compute before it; :meth:`_upload` waits."""
        if self._uploaded[i] or i in self._fetched:
            return
        parts = self._block_parts[i]
        pieces = {id(e.host): e.host for e in self._pending[i] if e.host is not None}
        hosts = [p.master for p in parts] + [host for *_, host in self._frozen[i]] + list(pieces.values())
        moved, done = self.copies.upload(i, hosts)
        masters, frozen = moved[: len(parts)], moved[len(parts) : len(parts) + len(self._frozen[i])]
        anchors = dict(zip(pieces, moved[len(parts) + len(self._frozen[i]) :]))
        self._fetched[i] = (masters, frozen, anchors, done)

    @torch.no_grad()
    def _upload(self, i: int) -> None:
        """Block i onto the device (fetched, or fetched now), with what is pending for it applied."""
        if self._uploaded[i]:
            return
        self._fetch(i)
        masters, frozen, anchors, done = self._fetched.pop(i)
        self.copies.use(done, [*masters, *frozen, *anchors.values()])
        for part, master in zip(self._block_parts[i], masters):
            work = master if part.in_place else master.to(part.work_dtype, copy=True)
            part.rebind(work, master)
        for (owner, name, is_param, _), moved in zip(self._frozen[i], frozen):
            if is_param:
                owner._parameters[name].data = moved
            else:
                owner._buffers[name] = moved
        self._uploaded[i] = True
        self.uploads[i] += 1
        for entry in self._pending[i]:  # the previous steps' updates (and pulls), in order
            entry.apply(anchors)
        self._dirty[i] = bool(self._pending[i])
        self._pending[i] = []

    @torch.no_grad()
    def _offload(self, i: int) -> None:
        """Block i back to host memory: theta copied home when it changed (no host wait: the copy
        runs on its own stream on a GPU); the device copies are dropped."""
        if not self._uploaded[i]:
            return
        parts = self._block_parts[i]
        for part in parts:
            part.restore()
        if self._dirty[i]:
            self.copies.home(i, [(self._host_master[id(part)], part.master) for part in parts])
        for part in parts:
            self._rebind_home(part)
        self._frozen_home(self._frozen[i])
        self._uploaded[i] = self._dirty[i] = False

    # -- the grouped forward -----------------------------------------------------------------
    def _route(self, model: nn.Module) -> None:
        """Send every block's forward, and every outermost resident module holding trainable
        weights, through :meth:`_grouped`."""
        for i, block in enumerate(self.blocks):
            block.forward = self._block_forward(i, block.forward)
        part_of = {id(p): part for part in self.placed.parts if id(part) not in self._home for _, p in part.params}
        blocks = {id(b) for b in self.blocks}
        covered: set[int] = set()  # the modules under a routed one (its forward runs them per group)
        for m in model.modules():  # parents before children
            if id(m) in covered or not any(id(p) in part_of for p in m.parameters(recurse=False)):
                continue
            if any(id(s) in blocks for s in m.modules()):
                raise NotImplementedError(
                    f"{type(m).__name__} holds trainable weights and the blocks: it cannot be streamed"
                )
            parts = {id(part_of[id(p)]): part_of[id(p)] for p in m.parameters() if id(p) in part_of}
            m.forward = self._resident_forward(list(parts.values()), m.forward)
            covered.update(id(s) for s in m.modules())

    def _block_forward(self, i: int, forward: Callable) -> Callable:
        def streamed(*args, **kwargs):
            self._upload(i)
            if i + 1 < len(self.blocks):
                self._fetch(i + 1)  # the next block's copy overlaps this block's compute
            parts = self._perturbed(self._block_parts[i])
            # in place, a perturbation and its restore leave theta rounded anew: it goes home
            self._dirty[i] = self._dirty[i] or (self._groups is not None and any(p.in_place for p in parts))
            try:
                return self._grouped(parts, forward, args, kwargs)
            finally:
                self._offload(i)

        return streamed

    def _resident_forward(self, parts: list[FlatParameters], forward: Callable) -> Callable:
        def grouped(*args, **kwargs):
            return self._grouped(self._perturbed(parts), forward, args, kwargs)

        return grouped

    def _perturbed(self, parts: list[FlatParameters]) -> list[FlatParameters]:
        active = {id(p) for p in self.placed.active}
        return [p for p in parts if id(p) in active]

    def _grouped(self, parts: list[FlatParameters], forward: Callable, args: tuple, kwargs: dict) -> Any:
        """``forward`` once per group of rows, ``parts`` perturbed for the group; outputs joined."""
        groups = self._groups
        if groups is None or not parts:  # evaluation, or nothing of this module is trained
            for part in parts:
                part.restore()
            return forward(*args, **kwargs)
        total = sum(rows for rows, _, _ in groups)
        batched = _has_batch((args, kwargs), total)
        outputs, start = [], 0
        for rows, seed, scale in groups:
            for part in parts:
                part.perturb(seed, scale)
            cut = slice(start, start + rows)
            if batched:
                outputs.append(forward(*_take(args, cut, total), **_take(kwargs, cut, total)))
            else:  # no rows in (positions): the group's output, broadcast to its rows below
                outputs.append(forward(*args, **kwargs))
            start += rows
        for part in parts:
            part.restore()
        return _join(outputs, [rows for rows, _, _ in groups], broadcast=not batched)

    @torch.no_grad()
    def two_point_losses(
        self,
        per_example_loss: Callable[[np.ndarray], torch.Tensor],
        passes: Sequence[tuple[np.ndarray, int]],
        beta: float,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(d, l+, l-) of every (batch, seed) of the step, from one streamed forward without
        autograd (a graph would keep every uploaded block alive); none when every batch of the
        step is empty (its releases are the noise alone, as the resident store's)."""
        if not passes:
            return []
        if self.blocks:
            self._fetch(0)  # block 0's copy overlaps the resident modules before it
        rows, groups = [], []
        for index, seed in passes:
            rows += [index, index]
            groups += [(len(index), int(seed), beta), (len(index), int(seed), -beta)]
        self._groups = groups
        try:
            losses = per_example_loss(np.concatenate(rows))
        finally:
            self._groups = None
        out, start = [], 0
        for index, _ in passes:
            n = len(index)
            plus, minus = losses[start : start + n], losses[start + n : start + 2 * n]
            out.append(((plus.double() - minus.double()) / (2.0 * beta), plus, minus))
            start += 2 * n
        return out

    # -- the rest of the store ----------------------------------------------------------------
    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype theta is held in."""
        return self.placed.master_dtype

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype the forward computes with."""
        return self.placed.work_dtype

    @property
    def master(self) -> torch.Tensor:
        """theta as one CPU tensor (a copy; a block's pending update not applied: :meth:`restore` first)."""
        self.copies.settle()
        return self.placed.master

    def weights_finite(self) -> bool:
        """Whether every coordinate of theta is finite (the blocks' read from host memory)."""
        self.copies.settle()
        return self.placed.weights_finite()

    def strided_theta(self, stride: int) -> torch.Tensor:
        """Every ``stride``-th coordinate of each part's theta, float32 on the CPU."""
        self.copies.settle()
        return self.placed.strided_theta(stride)

    def set_mask(
        self,
        indices: torch.Tensor | None,
        perturb_scales: torch.Tensor | None = None,
        update_scales: torch.Tensor | None = None,
    ) -> None:
        """Restrict training to the flat coordinates ``indices`` (None: dense), every pending update applied first."""
        self.restore()
        self.placed.set_mask(indices, perturb_scales, update_scales)

    def restore(self) -> None:
        """theta everywhere: every pending update applied (each block with one is uploaded once,
        the next one fetched meanwhile), and every copy home complete."""
        todo = [i for i in range(len(self.blocks)) if self._pending[i]]
        for k, i in enumerate(todo):
            self._upload(i)
            if k + 1 < len(todo):
                self._fetch(todo[k + 1])
            self._offload(i)
        self.placed.restore()
        self.copies.settle()

    def _when_present(self, entry: _Pending) -> None:
        """Resident parts move now; a block's part at its next upload (the step's scalars exist
        only after its last block)."""
        if id(entry.part) in self._home:
            self._pending[self._home[id(entry.part)]].append(entry)
        else:
            entry.apply({})

    def add_directions(self, moves: Sequence[tuple[int, Coefficient]]) -> None:
        """theta <- theta + sum_k coef_k z(seed_k) on the support, each block's at its next upload."""
        for part in self.placed.active:
            self._when_present(_Pending(part, moves=moves))

    def pull_toward(self, anchor: torch.Tensor, weight: float) -> None:
        """theta <- theta - weight (theta - anchor) on the support, each block's at its next upload
        (its piece of the anchor travels with the block, from host memory kept per block)."""
        pieces = self._anchor_pieces(anchor)
        for part, piece in self.placed.anchor_pieces(anchor):
            if id(part) in self._home:
                self._when_present(_Pending(part, host=pieces[id(part)], weight=weight))
            else:
                pull_part(part, piece, weight)

    @torch.no_grad()
    def _anchor_pieces(self, anchor: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each block part's piece of ``anchor`` in pinned host memory (on a GPU), so that its
        upload at every step is a copy that overlaps the compute: views of the anchor when it is
        this store's :meth:`snapshot` (page-locked already), else copied once per anchor (a
        stage's steps all pull toward the same one; a resumed anchor) into one arena per block."""
        if self._anchor is not None and self._anchor[0] is anchor:
            return self._anchor[1]
        by_block: list[list[tuple[FlatParameters, torch.Tensor]]] = [[] for _ in self.blocks]
        for part, piece in self.placed.anchor_pieces(anchor):
            if id(part) in self._home:
                by_block[self._home[id(part)]].append((part, piece))
        pieces = {}
        if self._snapshot is not None and self._snapshot() is anchor:
            pieces = {id(part): piece for held in by_block for part, piece in held}
            by_block = []
        for held in by_block:
            hosts = host_arena([piece for _, piece in held], pinned=self.device.type == "cuda")
            pieces.update({id(part): host for (part, _), host in zip(held, hosts)})
        self._anchor = (anchor, pieces)
        return pieces

    def snapshot(self) -> torch.Tensor:
        """A copy of theta on the support, in host memory (every pending update applied first),
        page-locked on a GPU: as the anchor, its block pieces are uploaded from it directly."""
        self.restore()
        snapshot = self.placed.snapshot()
        if self.device.type == "cuda" and torch.cuda.is_available() and snapshot.numel():
            page_lock(snapshot)
        self._snapshot = weakref.ref(snapshot)
        return snapshot

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """theta and the support (every pending update applied first)."""
        self.restore()
        return self.placed.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Continue from a state of this model (streamed, placed or in one buffer)."""
        master = state["master"]
        if master.numel() != self.numel:
            raise ValueError(f"a state of {master.numel()} parameters does not fit {self.numel}")
        self._pending = [[] for _ in self.blocks]
        self._fetched.clear()  # copies of the old theta
        self.copies.settle()  # no copy home may write the host copies after these
        self.set_mask(None)
        for part, (lo, hi) in zip(self.placed.parts, self.placed.spans()):
            if id(part) in self._home:  # at home: theta is the host master
                part.master.copy_(master[lo:hi])
            else:
                part.load_state_dict(
                    {"master": master[lo:hi], "mask": None, "perturb_scales": None, "update_scales": None}
                )
        if state["mask"] is not None:
            self.set_mask(state["mask"], state["perturb_scales"], state["update_scales"])
