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

Host memory holds per block theta in the master's precision (pinned when the device is a GPU);
with a master copy the block's 16-bit working weights exist only while it is uploaded.  While a
block computes, the next one is copied up on a separate CUDA stream (:meth:`_fetch`); the copy
home is synchronous.  Device memory holds the resident modules, the block being computed, the
next one, and the activations of the 2P groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
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


class StreamedParameters:
    """The trainable vector of a model whose blocks are streamed from host memory (module docstring).

    Builds the parts (a :class:`~dpzo.zo.placed.PlacedParameters`, ``placed``), moves the
    resident modules to ``device``, sends the blocks to host memory and routes the forward of
    every block and of every resident module that holds trainable weights through
    :meth:`_grouped`.  ``uploads[i]`` counts the uploads of block i.  A store of theta
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
        self._frozen = [self._frozen_tensors(block, trainable) for block in self.blocks]
        self._pending: list[list[Callable[[], None]]] = [[] for _ in self.blocks]
        self._uploaded = [True] * len(self.blocks)  # built where they were loaded: sent home below
        self._fetched: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], Any]] = {}  # copies under way
        self._stream: torch.cuda.Stream | None = None
        self.uploads = [0] * len(self.blocks)
        self._groups: list[tuple[int, int, float]] | None = None
        for i in range(len(self.blocks)):
            self._offload(i)
        self._route(model)

    # -- residency -------------------------------------------------------------------------
    def _frozen_tensors(self, block: nn.Module, trainable: set[int]) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
        """(owner, name, is a parameter, its host copy) of the block's frozen weights and buffers."""
        out = []
        for m in block.modules():
            for name, p in m.named_parameters(recurse=False):
                if id(p) not in trainable:
                    out.append((m, name, True, self._host_copy(p.data)))
            for name, b in m.named_buffers(recurse=False):
                out.append((m, name, False, self._host_copy(b)))
        return out

    def host_tensors(self) -> list[torch.Tensor]:
        """The blocks' home copies in host memory (theta and the frozen weights): what
        ``dpzo.zo.cost.measure(host=...)`` counts as host memory where the CPU is the device."""
        return [*self._host_master.values(), *(host for frozen in self._frozen for *_, host in frozen)]

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        host = t.detach().to("cpu")
        return host.pin_memory() if self.device.type == "cuda" else host

    @torch.no_grad()
    def _fetch(self, i: int) -> None:
        """Start copying block i to the device (on a copy stream on a GPU, so that it overlaps
        the compute of the block before it); :meth:`_upload` waits for it."""
        if self._uploaded[i] or i in self._fetched:
            return
        stream = self._copy_stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            masters = [part.master.to(self.device, copy=True, non_blocking=True) for part in self._block_parts[i]]
            frozen = [host.to(self.device, copy=True, non_blocking=True) for _, _, _, host in self._frozen[i]]
            done = stream.record_event() if stream is not None else None
        self._fetched[i] = (masters, frozen, done)

    def _copy_stream(self) -> torch.cuda.Stream | None:
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    @torch.no_grad()
    def _upload(self, i: int) -> None:
        """Block i onto the device (fetched, or fetched now), with what is pending for it applied."""
        if self._uploaded[i]:
            return
        self._fetch(i)
        masters, frozen, done = self._fetched.pop(i)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for t in (*masters, *frozen):  # made on the copy stream, used and freed on this one
                t.record_stream(compute)
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
        for apply in self._pending[i]:  # the previous step's update (and pull), in order
            apply()
        self._pending[i] = []

    @torch.no_grad()
    def _offload(self, i: int) -> None:
        """Block i back to host memory: theta copied home; the device copies are dropped."""
        if not self._uploaded[i]:
            return
        for part in self._block_parts[i]:
            part.restore()
            host = self._host_master.get(id(part))
            if host is None:
                host = self._host_master[id(part)] = self._host_copy(torch.empty_like(part.master, device="cpu"))
            host.copy_(part.master, non_blocking=True)
            # with a master copy the working weights exist only on the device: between uploads the
            # parameters view a zero-stride placeholder (no memory)
            work = host if part.in_place else torch.zeros(1, dtype=part.work_dtype).expand(part.numel)
            part.rebind(work, host)
        for owner, name, is_param, host in self._frozen[i]:
            if is_param:
                owner._parameters[name].data = host
            else:
                owner._buffers[name] = host
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the host copies are complete
        self._uploaded[i] = False

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
            try:
                return self._grouped(self._perturbed(self._block_parts[i]), forward, args, kwargs)
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

    def two_point_losses(
        self,
        per_example_loss: Callable[[np.ndarray], torch.Tensor],
        passes: Sequence[tuple[np.ndarray, int]],
        beta: float,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(d, l+, l-) of every (batch, seed) of the step, from one streamed forward."""
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
        return self.placed.master

    def weights_finite(self) -> bool:
        """Whether every coordinate of theta is finite (the blocks' read from host memory)."""
        return self.placed.weights_finite()

    def strided_theta(self, stride: int) -> torch.Tensor:
        """Every ``stride``-th coordinate of each part's theta, float32 on the CPU."""
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
        """theta everywhere: every pending update applied (each block with one is uploaded once)."""
        for i in range(len(self.blocks)):
            if self._pending[i]:
                self._upload(i)
                self._offload(i)
        self.placed.restore()

    def _when_present(self, part: FlatParameters, move: Callable[[], None]) -> None:
        """Resident parts move now; a block's part at its next upload (the step's scalars exist
        only after its last block)."""
        if id(part) in self._home:
            self._pending[self._home[id(part)]].append(move)
        else:
            move()

    def add_directions(self, moves: Sequence[tuple[int, Coefficient]]) -> None:
        """theta <- theta + sum_k coef_k z(seed_k) on the support, each block's at its next upload."""
        for part in self.placed.active:
            self._when_present(part, lambda part=part: move_part(part, moves))

    def pull_toward(self, anchor: torch.Tensor, weight: float) -> None:
        """theta <- theta - weight (theta - anchor) on the support, each block's at its next upload."""
        for part, piece in self.placed.anchor_pieces(anchor):
            self._when_present(part, lambda part=part, piece=piece: pull_part(part, piece, weight))

    def snapshot(self) -> torch.Tensor:
        """A copy of theta on the support, in host memory (every pending update applied first)."""
        self.restore()
        return self.placed.snapshot()

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
