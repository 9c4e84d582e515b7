"""Zeroth-order (SPSA) machinery: flat parameters, seeded directions, and the DP-ZOSO schedule.

:class:`FlatParameters` is the resident store of theta (``dpzo.zo.store.ParameterStore``): one
flat buffer on one device.  Its variants (in place or master copy, dense or masked, torch or
fused passes) are the objects of ``dpzo.zo.passes``, chosen once rather than tested per pass.

One step of DP-ZOSO (stage s, learning rate eta_s, ZO scale beta_s, anchor theta_s):

    for each of P directions p (each its own Poisson batch and its own accounted release):
        z_p    = N(0, I) regenerated from a public seed (never stored)
        d_i    = (loss_i(theta + beta z_p) - loss_i(theta - beta z_p)) / (2 beta)     per example
        g_p    = (sum_i clip_C(d_i) + sigma C nu) / (q n)          nu ~ N(0,1) from a secret RNG
    theta <- theta - eta_s * ( (1/P) sum_p g_p z_p + lam (theta - theta_s) )

The proximal pull lam (theta - theta_s) is a real gradient step on (lam/2)||theta - theta_s||^2:
it is not multiplied by z (the official code multiplies it by z and, through an aliased
``state_dict()``, always computes it as zero).

Design (where the time of a step goes, and how it is kept close to two forward passes):

* Every trainable parameter is re-pointed into one flat working buffer (the model's dtype), so a
  pass over the weights is a handful of large kernels instead of a few per tensor.
* z is a pure function of (seed, flat index): coordinate i is the counter-based Philox normal
  of (seed, i) (``dpzo.zo.philox``, Triton's ``tl.randn``), the same on every device and for any
  cut of the vector.  A pass draws it in blocks (:func:`block_size`: about 1/64 of the
  parameters, at most ``DIRECTION_CHUNK`` elements) into one buffer that lives as long as the
  pass and consumes each at once, so z is never materialised whole and no z is alive during a
  forward; a part of the parameters (one device's, ``dpzo.zo.placed``; one streamed block,
  ``dpzo.zo.streamed``) draws exactly its coordinates without the others: the trajectory does
  not depend on how the parameters are split.  (A part of at most ``WHOLE_Z_LIMIT`` coordinates
  keeps each z whole for the passes of its step instead: a few MB, drawn once rather than once
  per pass.)  A masked run sees exactly the dense z at its coordinates.
* Two ways to hold theta (``passes.MasterCopy``, ``passes.InPlace``):
  - with a master copy (``master_dtype``, float32 by default): a perturbation writes
    ``work = master + s z``, so the restore is exact and free (the next perturbation overwrites
    ``work`` anyway), and the update lands in the master's precision.  Use it when the model
    computes in 16 bits: an fp16 in-place update loses most of eta g z.
  - in place (``master_dtype=None``): theta lives in ``work`` itself, which costs no memory
    beyond inference.  Restore, update and the next perturbation are merged into one pass
    ``work += (beta - eta g) z_t + beta z_{t+1}``; as in the released code, a restore is exact
    only up to rounding (float32: about 1e-7 of beta z per step).
* Work is lazy: ``perturb`` replaces whatever perturbation is applied, an update is written
  when the next pass runs, and ``restore`` is only needed before the weights are read for
  something else (a stage boundary, a snapshot, evaluation).
* The released scalar g may be a 0-d tensor on the device: the update reads it there, so a
  step needs no host synchronisation.
* Masks (``passes.Masked``) are sorted int64 flat indices; z on the mask is gathered once per
  direction and kept for the passes of that step (``direction_cache_size`` directions), and
  masked passes work through the mask in slices of ``DIRECTION_CHUNK``, so their temporaries
  stay small.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from dpzo.zo import philox
from dpzo.zo.passes import Coefficient, Dense, Fused, Holding, InPlace, Masked, MasterCopy, Passes, Support

if TYPE_CHECKING:  # annotations only: the store module builds the stores
    from dpzo.zo.store import ResidentStore

DIRECTION_CHUNK = 1 << 22  # the most elements of z materialised at a time (memory only: z does not depend on it)
#: a part of at most this many coordinates (and at most ``DIRECTION_CHUNK``) keeps each direction's
#: z whole for the passes of its step: drawn once instead of once per pass, at the cost of a few
#: copies of z (4 MiB each in float32), which only small models can afford
WHOLE_Z_LIMIT = 1 << 20
#: a pass draws z in blocks of about 1/BLOCKS_PER_PART of the part (at least MIN_BLOCK), so the
#: block stays a small fraction of the weights it moves
BLOCKS_PER_PART = 64
MIN_BLOCK = 1 << 16


def block_size(numel: int) -> int:
    """Coordinates of z a pass over a part of ``numel`` coordinates draws at a time: about
    1/``BLOCKS_PER_PART`` of the part, at least ``MIN_BLOCK`` and at most ``DIRECTION_CHUNK``."""
    return max(1, min(DIRECTION_CHUNK, max(MIN_BLOCK, -(-int(numel) // BLOCKS_PER_PART))))


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)

#: devices whose first flatten needs no staging: the host itself, and meta (nothing to hold)
_HOST_LIKE = ("cpu", "meta")

#: the entries of a store's ``state_dict`` (all tensors or None): what a snapshot saves of theta
STATE_KEYS = ("master", "mask", "perturb_scales", "update_scales")


def direction_seed(run_seed: int, step: int, direction: int) -> int:
    """Public seed of z for (step, direction): a hash of the run seed, reproducible and spread out."""
    state = np.random.SeedSequence([int(run_seed), int(step), int(direction)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def gaussian_chunks(
    seed: int, numel: int, *, dtype: torch.dtype, device: torch.device, chunk: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset, z[offset:offset+len]) of the standard normal vector z(seed) of ``numel``
    coordinates, ``chunk`` (default ``DIRECTION_CHUNK``) at a time."""
    chunk = chunk or DIRECTION_CHUNK
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        yield start, philox.normal_(torch.empty(n, dtype=dtype, device=device), seed, start)


def gaussian_direction(
    seed: int,
    numel: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chunk: int | None = None,
) -> torch.Tensor:
    """The whole direction z for a seed (for tests and small models)."""
    out = torch.empty(numel, dtype=dtype, device=device)
    for start, z in gaussian_chunks(seed, numel, dtype=dtype, device=torch.device(device), chunk=chunk):
        out[start : start + z.numel()] = z
    return out


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_passes(device: torch.device, dtypes: Iterable[torch.dtype] = ()) -> types.ModuleType | None:
    """The kernels that run the passes over buffers of ``dtypes`` on ``device``, z drawn inside
    them, or None for the support's torch passes over blocks of z.  One order on every device:
    Triton (``dpzo.zo.kernels``) on a GPU where it is installed; the compiled CPU passes
    (``dpzo.zo.cpu_kernels``) on the CPU for float32 and float64 buffers where they load; torch
    elsewhere (MPS, 16-bit weights on the CPU).  ``DPZO_FUSED=0`` runs the torch passes
    everywhere; ``DPZO_FUSED=force`` runs the Triton kernels on any device (the CPU tests, under
    ``TRITON_INTERPRET=1``)."""
    choice = os.environ.get("DPZO_FUSED", "")
    if choice == "0":
        return None
    if choice == "force" or (device.type == "cuda" and _triton_installed()):
        from dpzo.zo import kernels

        return kernels
    if device.type == "cpu" and all(d in philox.COMPILED_DTYPES for d in dtypes):
        return philox.compiled()
    return None


def check_mask_indices(indices: torch.Tensor, numel: int) -> None:
    """A mask is non-empty, sorted, unique int64 flat indices inside a vector of ``numel``."""
    if (
        indices.numel() == 0
        or bool((indices[1:] <= indices[:-1]).any())
        or int(indices[0]) < 0
        or int(indices[-1]) >= numel
    ):
        raise ValueError("mask indices must be non-empty, sorted, unique and inside the parameter vector")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's trainable parameters in the order that defines the flat vector (tied ones once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _adopt_flat_buffer(params: list[tuple[str, torch.nn.Parameter]]) -> torch.Tensor | None:
    """The buffer the parameters already view, in order and without gaps (a previous flattening).

    Reusing it means a second ``FlatParameters`` on the same model costs neither a copy nor,
    transiently, a second set of weights.
    """
    first = params[0][1]
    if first.storage_offset() != 0:
        return None
    # storages compared by identity and positions by offset, not by address: a fake tensor
    # (``dpzo.zo.cost``, ``dpzo plan``) has no data pointer
    storage = first.untyped_storage()
    offset = 0
    for _, p in params:
        if (
            p.dtype != first.dtype
            or not p.is_contiguous()
            or p.untyped_storage()._cdata != storage._cdata
            or p.storage_offset() != offset
        ):
            return None
        offset += p.numel()
    if storage.nbytes() != offset * first.element_size():
        return None
    return first.detach().as_strided((offset,), (1,), 0)


def _losses_of(
    per_example_loss: Callable[[np.ndarray], torch.Tensor], index: np.ndarray, device: torch.device
) -> Callable[[], torch.Tensor]:
    """The losses of one batch share; a share may be empty when the batch is smaller than the ranks."""
    if len(index) == 0:
        return lambda: torch.zeros(0, dtype=torch.float64, device=device)
    return lambda: per_example_loss(index)


@torch.no_grad()
def spsa_differences(
    loss_fn: Callable[[], torch.Tensor], store: ResidentStore, seed: int, beta: float, *, restore: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example symmetric finite differences (l(theta+beta z) - l(theta-beta z)) / (2 beta).

    ``loss_fn`` returns the [B] per-example losses of one batched forward at the current
    working weights.  Returns (d in float64, losses at +beta, losses at -beta), all on the
    losses' device.  With ``restore`` the working weights are restored afterwards; the trainer
    passes False and lets the next pass overwrite them.
    """
    store.perturb(seed, +beta)
    loss_plus = loss_fn()
    store.perturb(seed, -beta)
    loss_minus = loss_fn()
    if restore:
        store.restore()
    return (loss_plus.double() - loss_minus.double()) / (2.0 * beta), loss_plus, loss_minus


def perturbed_two_point_losses(
    store: ResidentStore,
    per_example_loss: Callable[[np.ndarray], torch.Tensor],
    passes: Sequence[tuple[np.ndarray, int]],
    beta: float,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``two_point_losses`` of a resident store: two forwards per (batch share, seed), at theta
    + beta z and theta - beta z, the weights left perturbed for the next pass to overwrite."""
    return [
        spsa_differences(_losses_of(per_example_loss, index, store.device), store, seed, beta, restore=False)
        for index, seed in passes
    ]


class FlatParameters:
    """The model's trainable parameters as views into one flat buffer, with theta held exactly.

    ``work`` is what the model computes with (its own dtype).  ``master`` holds theta: a
    separate copy in ``master_dtype`` (float32 by default, float64 in tests), or, with
    ``master_dtype=None``, ``work`` itself (in place: no memory beyond the model's).  Tied
    parameters appear once because ``named_parameters`` de-duplicates them.

    ``work`` holds theta plus the perturbation last asked for; call :meth:`restore` before the
    weights are read for anything else than the perturbed losses.

    ``direction_cache_size`` is how many directions' z stay cached for the passes of a step
    (masked z on the mask, or whole z of a small model): a trainer with P directions per step
    passes P, so each z is drawn once per step.

    The variants are objects of ``dpzo.zo.passes``, chosen once: how theta is held
    (``InPlace`` / ``MasterCopy``, at construction), its support (``Dense`` / ``Masked``, by
    :meth:`set_mask`) and how a pass runs (the support's torch passes or ``Fused`` kernels, per
    device).  A :class:`~dpzo.zo.store.ResidentStore`.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        master_dtype: torch.dtype | None = torch.float32,
        *,
        direction_cache_size: int = 1,
        parameters: list[tuple[str, torch.nn.Parameter]] | None = None,
        offset: int = 0,
        staging: torch.Tensor | None = None,
    ):
        # ``parameters`` and ``offset``: one part of a model's trainable vector, its coordinates
        # [offset, offset + numel) (``dpzo.zo.placed``, ``dpzo.zo.streamed``).  ``staging``: host
        # memory of ``numel`` elements the parameters move through while the buffer is built
        # (default: a new one when they are on an accelerator; :meth:`_flatten`)
        self.params = parameters if parameters is not None else trainable_parameters(model)
        if not self.params:
            raise ValueError("model has no trainable parameters")
        self.device = self.params[0][1].device
        self.numel = sum(p.numel() for _, p in self.params)
        self.offset = int(offset)
        self.chunk = block_size(self.numel)  # fixed for this object's lifetime (z does not depend on it)
        self._keep_whole = self.numel <= min(WHOLE_Z_LIMIT, DIRECTION_CHUNK)
        self._ranges = self._block_ranges()
        self.work = self._flatten(staging)
        self.work_dtype = self.work.dtype
        self._holding: Holding = InPlace(self) if master_dtype is None else MasterCopy(self)
        self.master = self.work if self.in_place else self.work.to(master_dtype, copy=True)
        if not self.in_place and self.master.dtype != self.work.dtype:
            # theta is the master: the model starts at the master's value of every coordinate, so
            # a coordinate never trained reads the same as one restored from the master (and a run
            # resumed from a saved master equals one that never stopped).
            with torch.no_grad():
                self.work.copy_(self.master)
        # z in the master's precision; in place, 16-bit weights still get float32 z and
        # float32 arithmetic, rounded once per pass (``passes.Dense.move_work``).
        self.z_dtype = torch.float32 if self.in_place and self.work.dtype in _SIXTEEN_BIT else self.master.dtype
        self._whole_z: OrderedDict[int, torch.Tensor] = OrderedDict()  # small models: z per seed
        self.direction_cache_size = int(direction_cache_size)
        # the kernels that draw z inside the passes (Triton, compiled CPU), or None for torch
        self._kernels = fused_passes(self.device, (self.work.dtype, self.master.dtype))
        self._use(Dense(self))

    @torch.no_grad()
    def _flatten(self, staging: torch.Tensor | None) -> torch.Tensor:
        """The one buffer the parameters view from now on: the one they already view, or a copy.

        The device never holds two copies of the weights: on an accelerator the parameters first
        move tensor by tensor to ``staging`` (host memory), each original freed as it is copied,
        and only then is the buffer allocated and filled from there.  On the CPU the host is the
        device: the buffer is filled tensor by tensor, each original freed after its copy.
        """
        adopted = _adopt_flat_buffer(self.params)
        if adopted is not None:
            return adopted
        dtype = self.params[0][1].dtype
        if staging is None and self.device.type not in _HOST_LIKE:
            staging = torch.empty(self.numel, dtype=dtype, device="cpu")
        if staging is not None:
            if staging.dtype != dtype:
                raise ValueError(f"staging of {staging.dtype} for parameters of {dtype}")
            self._move_into(staging)
        work = torch.empty(self.numel, dtype=dtype, device=self.device)
        self._move_into(work)
        return work

    def _move_into(self, buffer: torch.Tensor) -> None:
        """Re-point the parameters into ``buffer``, tensor by tensor: each one's previous storage
        is freed as soon as it is copied (unless something else holds it)."""
        if buffer.numel() != self.numel:
            raise ValueError(f"a buffer of {buffer.numel()} elements does not hold {self.numel}")
        offset = 0
        for _, p in self.params:
            n = p.numel()
            view = buffer[offset : offset + n].view(p.shape)
            view.copy_(p)
            p.data = view
            offset += n

    def _use(self, support: Support) -> None:
        """Train ``support`` from now on, with the passes this device runs."""
        self._support = support
        self._passes: Passes = support if self._kernels is None else Fused(support, self._kernels)

    def _block_ranges(self) -> list[tuple[int, int]]:
        """(local start, local end) of each block of at most ``chunk`` coordinates a pass draws z
        for at a time (z depends on the global index only, not on where the blocks start)."""
        return [(lo, min(lo + self.chunk, self.numel)) for lo in range(0, self.numel, self.chunk)]

    @property
    def _whole(self) -> bool:
        """A small part keeps each z whole for the passes of its step (drawn once, not per pass)."""
        return self._keep_whole

    def _pass_ranges(self) -> list[tuple[int, int]]:
        """The local ranges a pass over z visits, in order (what :meth:`_blocks` yields)."""
        return [(0, self.numel)] if self._whole else self._ranges

    # -- what the other modules read -----------------------------------------------------------
    @property
    def in_place(self) -> bool:
        """Whether theta is the working weights themselves (no master copy)."""
        return self._holding.in_place

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype theta is held in (the model's own in place)."""
        return self.master.dtype

    @property
    def mask(self) -> torch.Tensor | None:
        """The trained coordinates (sorted flat indices), or None: all of them."""
        return self._support.mask

    @property
    def perturb_scales(self) -> torch.Tensor | None:
        return self._support.perturb_scales

    @property
    def update_scales(self) -> torch.Tensor | None:
        return self._support.update_scales

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every coordinate of theta is finite (one host read).

        The smallest and largest coordinates are finite exactly when all are (both reductions
        propagate NaN), so the check allocates two scalars, not one byte per parameter as
        ``isfinite(theta).all()`` does (+25 % of float32 weights, inside the step's peak)."""
        lowest, highest = torch.aminmax(self.master)
        return bool(torch.isfinite(lowest) & torch.isfinite(highest))

    @torch.no_grad()
    def strided_theta(self, stride: int) -> torch.Tensor:
        """Every ``stride``-th coordinate of theta, float32 on the CPU."""
        return self.master[::stride].float().cpu()

    # -- the trainable support ------------------------------------------------------------
    def set_mask(
        self,
        indices: torch.Tensor | None,
        perturb_scales: torch.Tensor | None = None,
        update_scales: torch.Tensor | None = None,
    ) -> None:
        """Restrict perturbation and update to the flat coordinates ``indices`` (None: dense).

        ``indices`` are sorted unique int64 flat indices; z at a masked coordinate is the dense
        z at that coordinate, so a mask selects from the same direction a dense run would use.
        Optional per-coordinate scales multiply the perturbation (``rank`` mode) and the update.
        Coordinates outside the mask are never written: they stay bit-identical.
        """
        if indices is None:
            self.restore()
            self._use(Dense(self))
            return
        indices = indices.to(device=self.device, dtype=torch.long)
        check_mask_indices(indices, self.numel)
        self.restore()
        self._use(Masked.on(self, indices, perturb_scales, update_scales))

    # -- z ----------------------------------------------------------------------------------
    def new_block(self) -> torch.Tensor:
        """A buffer for one range of a pass (:meth:`_pass_ranges`) in z's dtype.  A pass allocates
        its buffers and drops them when it ends, so they are never alive during a forward (a GPU's
        caching allocator hands the same memory back at the next pass, without a device call)."""
        largest = self.numel if self._whole else min(self.chunk, self.numel)
        return torch.empty(largest, dtype=self.z_dtype, device=self.device)

    def _blocks(self, seeds: Sequence[int]) -> Iterator[tuple[int, int, Callable[[int], torch.Tensor]]]:
        """Yield (start, end, draw) per block; ``draw(k)`` returns z(seeds[k])[start:end].

        Each seed streams from its own generator; all of them share one block buffer, so a
        block of z(seeds[k]) is valid until the next ``draw``.  ``draw`` must be called once per
        seed and block, in seed order (the streams advance in lockstep).
        """
        if self._whole:
            # A small part: z of a seed is kept whole for the passes of its step, so each
            # direction is drawn once instead of once per pass.
            whole = [self._whole_direction(seed) for seed in seeds]
            yield 0, self.numel, lambda k: whole[k]
            return
        buf = self.new_block()  # freed with this generator, at the end of the pass
        for lo, hi in self._ranges:
            view = buf[: hi - lo]

            def draw(k: int, view=view, lo=lo) -> torch.Tensor:
                return philox.normal_(view, int(seeds[k]), self.offset + lo)

            yield lo, hi, draw

    def _whole_direction(self, seed: int) -> torch.Tensor:
        """This part's z(seed), drawn block by block as :meth:`_blocks` would; kept for the passes
        of a step: the current step's directions and the next one's first (whose pass merges them)."""
        z = self._whole_z.get(seed)
        if z is not None:
            self._whole_z.move_to_end(seed)
            return z
        z = philox.normal_(torch.empty(self.numel, dtype=self.z_dtype, device=self.device), int(seed), self.offset)
        self._whole_z[seed] = z
        while len(self._whole_z) > max(self.direction_cache_size, 1) + 1:
            self._whole_z.popitem(last=False)
        return z

    def direction(self, seed: int) -> torch.Tensor:
        """z(seed) on the trainable support: the whole vector, or its masked coordinates.

        The masked vector is cached for the passes of the current step; do not modify it.
        """
        return self._support.direction(seed)

    # -- the passes ---------------------------------------------------------------------------
    def two_point_losses(
        self,
        per_example_loss: Callable[[np.ndarray], torch.Tensor],
        passes: Sequence[tuple[np.ndarray, int]],
        beta: float,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(d, l+, l-) of every (batch, seed): two forwards each (:func:`perturbed_two_point_losses`)."""
        return perturbed_two_point_losses(self, per_example_loss, passes, beta)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """work <- theta + scale * z(seed) on the support (times the perturbation scales, if any)."""
        self._holding.perturb((int(seed), scale, self._support.perturb_scales))

    @torch.no_grad()
    def restore(self) -> None:
        """work <- theta (bit-exact with a master copy).

        With a mask only the masked coordinates can differ (nothing else is ever written), so
        only those are copied: the restore costs O(mask), not O(parameters).
        """
        self._holding.restore()

    @torch.no_grad()
    def add_directions(self, moves: Sequence[tuple[int, Coefficient]]) -> None:
        """theta <- theta + sum_k coef_k * z(seed_k) on the support (times the update scales).

        With a master copy all directions are added in one pass over the master; in place the
        move is merged into the next pass over ``work`` (restore + update + next perturbation).
        """
        self._holding.add([(int(seed), coef, self._support.update_scales) for seed, coef in moves])

    # -- where theta lives ---------------------------------------------------------------------
    @torch.no_grad()
    def rebind(self, work: torch.Tensor, master: torch.Tensor) -> None:
        """Hold theta in ``master`` and compute with ``work`` from now on (another device, or host
        memory between a streamed block's uploads: ``dpzo.zo.streamed``).  The parameters view
        ``work``; the mask, its scales and the z buffers follow ``master``'s device.  The part
        must be restored (``work`` equal to theta), so nothing pending is lost.
        """
        if not self._holding.restored:
            raise RuntimeError("restore the parameters before moving them")
        if work.numel() != self.numel or master.numel() != self.numel:
            raise ValueError(f"buffers of {work.numel()} and {master.numel()} elements do not hold {self.numel}")
        self.work, self.master = work, master
        offset = 0
        for _, p in self.params:
            n = p.numel()
            p.data = work[offset : offset + n].view(p.shape)
            offset += n
        self.device = master.device
        self._kernels = fused_passes(self.device, (self.work.dtype, self.master.dtype))
        self._whole_z.clear()
        self._use(self._support.to(self.device))

    # -- snapshots of the whole state -------------------------------------------------------
    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """theta and the trainable support, as CPU copies (safe to keep while training goes on).

        ``master`` is theta itself: the master copy, or in place the weights.  Restores are
        deferred, so ``work`` first gets theta back (and in place the update not yet written);
        the next pass then starts from the restored weights, which in place splits one pass in
        two and so changes only the rounding.
        """
        self.restore()
        state = {
            "master": self.master,
            "mask": self.mask,
            "perturb_scales": self.perturb_scales,
            "update_scales": self.update_scales,
        }
        return {k: None if t is None else t.detach().to("cpu", copy=True).contiguous() for k, t in state.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Continue from :meth:`state_dict`: theta, and the support with its scales.

        Outside the mask ``work`` gets theta too, as in a run that never stopped.
        """
        master = state["master"]
        if master.numel() != self.numel:
            raise ValueError(f"a state of {master.numel()} parameters does not fit {self.numel}")
        self.master.copy_(master.to(self.device))
        self._holding.loaded()  # work == theta now
        if state["mask"] is None:
            self.set_mask(None)
        else:
            dev = dict(device=self.device)
            self.set_mask(
                state["mask"].to(**dev),
                perturb_scales=None if state["perturb_scales"] is None else state["perturb_scales"].to(**dev),
                update_scales=None if state["update_scales"] is None else state["update_scales"].to(**dev),
            )

    @torch.no_grad()
    def snapshot(self) -> torch.Tensor:
        """A real copy of theta on the support (the proximal anchor); never an alias."""
        self._holding.settle()
        return self._support.gather(self.master)

    @torch.no_grad()
    def pull_toward(self, anchor: torch.Tensor, weight: float) -> None:
        """theta <- theta - weight (theta - anchor) on the support."""
        self._holding.settle()  # in place the pull needs theta itself, not a perturbed copy
        self._support.pull(self.master, anchor, weight)
        self._holding.master_written()
