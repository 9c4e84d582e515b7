"""Zeroth-order (SPSA) machinery: flat parameters, seeded directions, and the DP-ZOSO schedule.

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
  cut of the vector.  A pass draws it in blocks of ``DIRECTION_CHUNK`` elements into one
  preallocated buffer and consumes each at once, so z is never materialised whole, and a part of
  the parameters (one device's, ``dpzo.zo.placed``; one streamed block, ``dpzo.zo.streamed``)
  draws exactly its coordinates without the others: the trajectory does not depend on how the
  parameters are split.  (A model of at most one block keeps each z whole for the passes of its
  step instead: a few MB, drawn once rather than once per pass.)  A masked run sees exactly the
  dense z at its coordinates.
* Two ways to hold theta:
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
* Masks are sorted int64 flat indices; z on the mask is gathered once per direction and kept
  for the passes of that step (``direction_cache_size`` directions), and masked passes work
  through the mask in slices of ``DIRECTION_CHUNK``, so their temporaries stay small.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from dpzo.zo import philox

DIRECTION_CHUNK = 1 << 22  # elements of z materialised at a time (memory only: z does not depend on it)


#: A coefficient of z: a Python number, or a 0-d tensor on the parameters' device (a released
#: scalar that has not been copied to the host).
Coefficient = float | torch.Tensor


#: (seed, coefficient, per-coordinate scales on the mask or None): the move ``coefficient * z(seed)``.
Term = tuple[int, Coefficient, torch.Tensor | None]


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


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


def _axpy(x: torch.Tensor, z: torch.Tensor, coef: Coefficient) -> None:
    """x += coef * z, reading a tensor coefficient on the device (no host synchronisation)."""
    if isinstance(coef, torch.Tensor):
        x.addcmul_(z, coef)
    else:
        x.add_(z, alpha=coef)


def _merge(terms: Sequence[Term]) -> list[Term]:
    """Sum the coefficients of terms with the same seed and scales, so each z is drawn once."""
    merged: dict[tuple[int, int], list] = {}
    for seed, coef, scales in terms:
        key = (seed, id(scales))
        if key in merged:
            merged[key][1] = merged[key][1] + coef
        else:
            merged[key] = [seed, coef, scales]
    return [(s, c, sc) for s, c, sc in merged.values() if isinstance(c, torch.Tensor) or c != 0]


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_passes(device: torch.device) -> bool:
    """Whether the passes run as fused Triton kernels (``dpzo.zo.kernels``): on a GPU when Triton
    is installed.  ``DPZO_FUSED=0`` turns them off; ``DPZO_FUSED=force`` uses them on any device
    (the CPU tests, under ``TRITON_INTERPRET=1``)."""
    choice = os.environ.get("DPZO_FUSED", "")
    if choice == "0":
        return False
    if choice == "force":
        return True
    return device.type == "cuda" and _triton_installed()


def _groups_by_scales(terms: Sequence[Term]) -> list[tuple[torch.Tensor | None, list[int], list[Coefficient]]]:
    """The terms grouped by their per-coordinate scales (one fused masked pass per group)."""
    groups: dict[int, tuple[torch.Tensor | None, list[int], list[Coefficient]]] = {}
    for seed, coef, scales in terms:
        group = groups.setdefault(id(scales), (scales, [], []))
        group[1].append(seed)
        group[2].append(coef)
    return list(groups.values())


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
    base, size = first.untyped_storage().data_ptr(), first.element_size()
    offset = 0
    for _, p in params:
        if (
            p.dtype != first.dtype
            or not p.is_contiguous()
            or p.untyped_storage().data_ptr() != base
            or p.data_ptr() != base + offset * size
        ):
            return None
        offset += p.numel()
    if first.untyped_storage().nbytes() != offset * size:
        return None
    return first.detach().as_strided((offset,), (1,), 0)


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
    """

    #: the entries of :meth:`state_dict` (all tensors or None)
    STATE_KEYS = ("master", "mask", "perturb_scales", "update_scales")

    def __init__(
        self,
        model: torch.nn.Module | None,
        master_dtype: torch.dtype | None = torch.float32,
        *,
        direction_cache_size: int = 1,
        parameters: list[tuple[str, torch.nn.Parameter]] | None = None,
        offset: int = 0,
    ):
        # ``parameters`` and ``offset``: one part of a model's trainable vector, its coordinates
        # [offset, offset + numel) (``dpzo.zo.placed``, ``dpzo.zo.streamed``)
        self.params = parameters if parameters is not None else trainable_parameters(model)
        if not self.params:
            raise ValueError("model has no trainable parameters")
        first = self.params[0][1]
        self.device = first.device
        self.numel = sum(p.numel() for _, p in self.params)
        self.offset = int(offset)
        self.chunk = DIRECTION_CHUNK  # fixed for this object's lifetime: it defines z
        self._ranges = self._block_ranges()
        adopted = _adopt_flat_buffer(self.params)
        if adopted is not None:
            self.work = adopted
        else:
            self.work = torch.empty(self.numel, dtype=first.dtype, device=self.device)
            offset = 0
            with torch.no_grad():
                for _, p in self.params:
                    n = p.numel()
                    self.work[offset : offset + n].copy_(p.reshape(-1))
                    p.data = self.work[offset : offset + n].view_as(p)
                    offset += n
        self.in_place = master_dtype is None
        self.fused = fused_passes(self.device)  # z drawn inside the passes' kernels (dpzo.zo.kernels)
        self.master = self.work if self.in_place else self.work.to(master_dtype, copy=True)
        if not self.in_place and self.master.dtype != self.work.dtype:
            # theta is the master: the model starts at the master's value of every coordinate, so
            # a coordinate never trained reads the same as one restored from the master (and a run
            # resumed from a saved master equals one that never stopped).
            with torch.no_grad():
                self.work.copy_(self.master)
        # z in the master's precision; in place, 16-bit weights still get float32 z and
        # float32 arithmetic, rounded once per pass (see _move_work).
        self.z_dtype = torch.float32 if self.in_place and self.work.dtype in _SIXTEEN_BIT else self.master.dtype
        self._applied: list[Term] = []  # what work holds on top of theta
        self._pending: list[Term] = []  # in place: moves of theta not yet written to work
        self._stale = False  # master mode: work lags behind master
        self._block: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None  # in place, 16-bit: the pass's sum of terms
        self._masked_z: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._whole_z: OrderedDict[int, torch.Tensor] = OrderedDict()  # small models: z per seed
        self.direction_cache_size = int(direction_cache_size)
        self._mask_blocks: list[tuple[int, int, int, int]] = []

    def _block_ranges(self) -> list[tuple[int, int]]:
        """(local start, local end) of each block of at most ``chunk`` coordinates a pass draws z
        for at a time (z depends on the global index only, not on where the blocks start)."""
        return [(lo, min(lo + self.chunk, self.numel)) for lo in range(0, self.numel, self.chunk)]

    @property
    def _whole(self) -> bool:
        """A small part keeps each z whole for the passes of its step (drawn once, not per pass)."""
        return self.numel <= self.chunk

    def _pass_ranges(self) -> list[tuple[int, int]]:
        """The local ranges a pass over z visits, in order (what :meth:`_blocks` yields)."""
        return [(0, self.numel)] if self._whole else self._ranges

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
            self.mask = self.perturb_scales = self.update_scales = None
            self._masked_z.clear()
            return
        indices = indices.to(device=self.device, dtype=torch.long)
        check_mask_indices(indices, self.numel)
        self.restore()
        self.mask = indices
        to = dict(device=self.device, dtype=self.z_dtype)
        self.perturb_scales = None if perturb_scales is None else perturb_scales.to(**to)
        self.update_scales = None if update_scales is None else update_scales.to(**to)
        self._masked_z.clear()
        # Which masked coordinates fall in each block of z: found once here (one host sync),
        # not in every pass.
        ranges = self._pass_ranges()
        edges = [lo for lo, _ in ranges] + [self.numel]
        bounds = torch.searchsorted(indices, torch.tensor(edges, device=self.device)).tolist()
        self._mask_blocks = [(lo, hi, bounds[i], bounds[i + 1]) for i, (lo, hi) in enumerate(ranges)]

    mask: torch.Tensor | None = None
    perturb_scales: torch.Tensor | None = None
    update_scales: torch.Tensor | None = None

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype theta is held in (the model's own in place)."""
        return self.master.dtype

    @property
    def parts(self) -> list[FlatParameters]:
        """The buffers theta lives in: this one (a placed model has one per device)."""
        return [self]

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every coordinate of theta is finite (one host read)."""
        return bool(torch.isfinite(self.master).all())

    # -- z ----------------------------------------------------------------------------------
    def _block_buffer(self) -> torch.Tensor:
        if self._block is None:
            self._block = torch.empty(min(self.chunk, self.numel), dtype=self.z_dtype, device=self.device)
        return self._block

    def _sum_buffer(self) -> torch.Tensor:
        if self._sum is None:
            self._sum = torch.empty(min(self.chunk, self.numel), dtype=self.z_dtype, device=self.device)
        return self._sum

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
        buf = self._block_buffer()
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
        if self.mask is None:
            out = torch.empty(self.numel, dtype=self.z_dtype, device=self.device)
            for start, end, draw in self._blocks([seed]):
                out[start:end] = draw(0)
            return out
        if seed in self._masked_z:
            self._masked_z.move_to_end(seed)
            return self._masked_z[seed]
        out = torch.empty(self.mask.numel(), dtype=self.z_dtype, device=self.device)
        for (start, _, lo, hi), (_, _, draw) in zip(self._mask_blocks, self._blocks([seed])):
            z = draw(0)
            if hi > lo:
                torch.index_select(z, 0, self.mask[lo:hi] - start, out=out[lo:hi])
        self._masked_z[seed] = out
        while len(self._masked_z) > max(self.direction_cache_size, 1):
            self._masked_z.popitem(last=False)
        return out

    def _mask_slices(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(a, b, mask[a:b]) over the mask in slices of at most ``chunk`` coordinates."""
        for a in range(0, self.mask.numel(), self.chunk):
            b = min(a + self.chunk, self.mask.numel())
            yield a, b, self.mask[a:b]

    @staticmethod
    def _scaled(z: torch.Tensor, scales: torch.Tensor | None, a: int, b: int) -> torch.Tensor:
        return z[a:b] if scales is None else z[a:b] * scales[a:b]

    # -- the passes ---------------------------------------------------------------------------
    def _fused_pass(self, out: torch.Tensor, base: torch.Tensor, terms: Sequence[Term]) -> None:
        """``out = base + sum of the terms`` on the support, z drawn inside Triton kernels (one
        kernel per distinct scales: a masked pass may mix perturbation and update scales)."""
        from dpzo.zo import kernels

        for scales, seeds, coefs in _groups_by_scales(terms):
            if self.mask is None:
                kernels.dense_pass(out, base, seeds, coefs, offset=self.offset)
            else:
                kernels.masked_pass(out, base, self.mask, seeds, coefs, offset=self.offset, scales=scales)

    @torch.no_grad()
    def _move_work(self, terms: Sequence[Term]) -> None:
        """In place: work += sum of the terms.

        Dense: one pass over the weights; 16-bit weights get the terms' float32 sum, so they
        are rounded once per pass.  Masked: term by term (one masked z alive at a time).
        """
        terms = _merge(terms)
        if not terms:
            return
        if self.fused:
            self._fused_pass(self.work, self.work, terms)
            return
        if self.mask is not None:
            for seed, coef, scales in terms:
                z = self.direction(seed)
                for a, b, idx in self._mask_slices():
                    moved = self.work[idx].to(self.z_dtype)  # a fresh gather
                    _axpy(moved, self._scaled(z, scales, a, b), coef)
                    self.work.index_copy_(0, idx, moved.to(self.work.dtype))
                del z  # let the cache drop it before the next direction is drawn
            return
        summed = len(terms) > 1 and self.work.dtype != self.z_dtype
        for start, end, draw in self._blocks([seed for seed, _, _ in terms]):
            target = self.work[start:end]
            if summed:
                total = self._sum_buffer()[: end - start]
                for k, (_, coef, _) in enumerate(terms):
                    if k == 0:
                        torch.mul(draw(k), coef, out=total)
                    else:
                        _axpy(total, draw(k), coef)
                target.add_(total)
            else:
                for k, (_, coef, _) in enumerate(terms):
                    _axpy(target, draw(k), coef)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """work <- theta + scale * z(seed) on the support (times the perturbation scales, if any)."""
        term = (int(seed), scale, self.perturb_scales)
        if self.in_place:
            undo = [(s, -c, sc) for s, c, sc in self._applied]
            self._move_work(undo + self._pending + [term])
        elif self.fused:
            self._fused_pass(self.work, self.master, [term])
        elif self.mask is None:
            for start, end, draw in self._blocks([seed]):
                torch.add(self.master[start:end], draw(0), alpha=scale, out=self.work[start:end])
        else:
            z = self.direction(seed)
            for a, b, idx in self._mask_slices():
                moved = self.master[idx]  # a fresh gather
                moved.add_(self._scaled(z, term[2], a, b), alpha=scale)
                self.work.index_copy_(0, idx, moved.to(self.work.dtype))
        self._applied, self._pending, self._stale = [term], [], False

    @torch.no_grad()
    def restore(self) -> None:
        """work <- theta (bit-exact with a master copy).

        With a mask only the masked coordinates can differ (nothing else is ever written), so
        only those are copied: the restore costs O(mask), not O(parameters).
        """
        if self.in_place:
            self._move_work([(s, -c, sc) for s, c, sc in self._applied] + self._pending)
        elif self._applied or self._stale:
            if self.mask is None:
                self.work.copy_(self.master)
            else:
                for _, _, idx in self._mask_slices():
                    self.work.index_copy_(0, idx, self.master[idx].to(self.work.dtype))
        self._applied, self._pending, self._stale = [], [], False

    @torch.no_grad()
    def add_directions(self, moves: Sequence[tuple[int, Coefficient]]) -> None:
        """theta <- theta + sum_k coef_k * z(seed_k) on the support (times the update scales).

        With a master copy all directions are added in one pass over the master; in place the
        move is merged into the next pass over ``work`` (restore + update + next perturbation).
        """
        terms = [(int(seed), coef, self.update_scales) for seed, coef in moves]
        if self.in_place:
            self._pending.extend(terms)
            return
        terms = _merge(terms)
        if terms and self.fused:
            self._fused_pass(self.master, self.master, terms)
        elif terms:
            if self.mask is not None:
                for seed, coef, scales in terms:
                    z = self.direction(seed)
                    for a, b, idx in self._mask_slices():
                        zs = self._scaled(z, scales, a, b)
                        if isinstance(coef, torch.Tensor):
                            self.master.index_add_(0, idx, zs * coef)
                        else:
                            self.master.index_add_(0, idx, zs, alpha=coef)
                    del z
            else:
                for start, end, draw in self._blocks([seed for seed, _, _ in terms]):
                    target = self.master[start:end]
                    for k, (_, coef, _) in enumerate(terms):
                        _axpy(target, draw(k), coef)
        self._stale = True

    def add_direction(self, seed: int, coef: Coefficient) -> None:
        """master <- master + coef * z(seed) on the support (times the update scales, if any)."""
        self.add_directions([(seed, coef)])

    # -- where theta lives ---------------------------------------------------------------------
    @torch.no_grad()
    def rebind(self, work: torch.Tensor, master: torch.Tensor) -> None:
        """Hold theta in ``master`` and compute with ``work`` from now on (another device, or host
        memory between a streamed block's uploads: ``dpzo.zo.streamed``).  The parameters view
        ``work``; the mask, its scales and the z buffers follow ``master``'s device.  The part
        must be restored (``work`` equal to theta), so nothing pending is lost.
        """
        if self._applied or self._pending or self._stale:
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
        self.fused = fused_passes(self.device)
        self._block, self._sum = None, None
        self._masked_z.clear()
        self._whole_z.clear()
        if self.mask is not None:
            self.mask = self.mask.to(self.device, non_blocking=True)
            for name in ("perturb_scales", "update_scales"):
                scales = getattr(self, name)
                if scales is not None:
                    setattr(self, name, scales.to(self.device, non_blocking=True))

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
        if not self.in_place:
            self.work.copy_(self.master)
        self._applied, self._pending, self._stale = [], [], False  # work == theta now
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
        if self.in_place:
            self.restore()
        return self.master.clone() if self.mask is None else self.master[self.mask].clone()

    @torch.no_grad()
    def pull_toward(self, anchor: torch.Tensor, weight: float) -> None:
        """theta <- theta - weight (theta - anchor) on the support."""
        if self.in_place:
            self.restore()  # the pull needs theta itself, not a perturbed copy
        if self.mask is None:
            # (1 - w) theta + w anchor  ==  theta - w (theta - anchor)
            self.master.mul_(1.0 - weight).add_(anchor, alpha=weight)
        else:
            pulled = self.master[self.mask].mul_(1.0 - weight).add_(anchor, alpha=weight)
            self.master.index_copy_(0, self.mask, pulled)
        self._stale = not self.in_place
