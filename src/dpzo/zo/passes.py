"""The variants of one flat buffer's passes, each chosen once, when the buffer is built or changes.

A :class:`~dpzo.zo.flat.FlatParameters` combines three choices, each a small object here instead
of a flag tested in every pass:

* how theta is held (chosen at construction): :class:`InPlace` (theta is the working weights;
  restore, update and the next perturbation are merged into one pass) or :class:`MasterCopy`
  (theta in a separate master; a perturbation writes ``work = master + s z``, the restore is a
  copy);
* which coordinates a pass touches (chosen by ``set_mask``): :class:`Dense` or :class:`Masked`
  (sorted flat indices, z gathered on the mask once per direction);
* how a pass runs (chosen per device): the support's own torch passes over blocks of z, or
  :class:`Fused` kernels that draw z in registers (Triton's ``dpzo.zo.kernels`` on a GPU, the
  compiled ``dpzo.zo.cpu_kernels`` on the CPU).

A support and the fused kernels offer the same three passes: :meth:`Dense.perturb_work`
(``work = master + s z``), :meth:`Dense.move_work` (in place: ``work += sum of terms``) and
:meth:`Dense.add_to_master` (``master += sum of terms``).  Every object reads the buffers
through the ``FlatParameters`` it belongs to (``flat``): a streamed block's buffers change
between uploads (``FlatParameters.rebind``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # annotations only: a FlatParameters builds these objects
    from dpzo.zo.flat import FlatParameters


#: A coefficient of z: a Python number, or a 0-d tensor on the parameters' device (a released
#: scalar that has not been copied to the host).
Coefficient = float | torch.Tensor


#: (seed, coefficient, per-coordinate scales on the mask or None): the move ``coefficient * z(seed)``.
Term = tuple[int, Coefficient, torch.Tensor | None]


def axpy(x: torch.Tensor, z: torch.Tensor, coef: Coefficient) -> None:
    """x += coef * z, reading a tensor coefficient on the device (no host synchronisation)."""
    if isinstance(coef, torch.Tensor):
        x.addcmul_(z, coef)
    else:
        x.add_(z, alpha=coef)


def merge_terms(terms: Sequence[Term]) -> list[Term]:
    """Sum the coefficients of terms with the same seed and scales, so each z is drawn once."""
    merged: dict[tuple[int, int], list] = {}
    for seed, coef, scales in terms:
        key = (seed, id(scales))
        if key in merged:
            merged[key][1] = merged[key][1] + coef
        else:
            merged[key] = [seed, coef, scales]
    return [(s, c, sc) for s, c, sc in merged.values() if isinstance(c, torch.Tensor) or c != 0]


def groups_by_scales(terms: Sequence[Term]) -> list[tuple[torch.Tensor | None, list[int], list[Coefficient]]]:
    """The terms grouped by their per-coordinate scales (one fused masked pass per group)."""
    groups: dict[int, tuple[torch.Tensor | None, list[int], list[Coefficient]]] = {}
    for seed, coef, scales in terms:
        group = groups.setdefault(id(scales), (scales, [], []))
        group[1].append(seed)
        group[2].append(coef)
    return list(groups.values())


class Passes(Protocol):
    """The three passes over a buffer's support (a support's torch passes, or :class:`Fused`)."""

    def perturb_work(self, term: Term) -> None: ...

    def move_work(self, terms: Sequence[Term]) -> None: ...

    def add_to_master(self, terms: Sequence[Term]) -> None: ...


# -- which coordinates ------------------------------------------------------------------------
class Dense:
    """Every coordinate of the buffer; z drawn block by block (``FlatParameters._blocks``)."""

    mask: torch.Tensor | None = None
    perturb_scales: torch.Tensor | None = None
    update_scales: torch.Tensor | None = None

    def __init__(self, flat: FlatParameters):
        self.flat = flat

    def to(self, device: torch.device) -> Dense:
        """This support for the buffer's new device (nothing to move)."""
        return self

    def direction(self, seed: int) -> torch.Tensor:
        flat = self.flat
        out = torch.empty(flat.numel, dtype=flat.z_dtype, device=flat.device)
        for start, end, draw in flat._blocks([seed]):
            out[start:end] = draw(0)
        return out

    # the torch passes
    def perturb_work(self, term: Term) -> None:
        flat, (seed, scale, _) = self.flat, term
        for start, end, draw in flat._blocks([seed]):
            torch.add(flat.master[start:end], draw(0), alpha=scale, out=flat.work[start:end])

    def move_work(self, terms: Sequence[Term]) -> None:
        """One pass over the weights; 16-bit weights get the terms' float32 sum, so they are
        rounded once per pass."""
        self._add(self.flat.work, terms)

    def add_to_master(self, terms: Sequence[Term]) -> None:
        self._add(self.flat.master, terms)

    def _add(self, buffer: torch.Tensor, terms: Sequence[Term]) -> None:
        flat = self.flat
        # 16-bit weights get the terms' sum in z's dtype (one buffer for the pass, dropped after it)
        sums = flat.new_block() if len(terms) > 1 and buffer.dtype != flat.z_dtype else None
        for start, end, draw in flat._blocks([seed for seed, _, _ in terms]):
            target = buffer[start:end]
            if sums is not None:
                total = sums[: end - start]
                for k, (_, coef, _) in enumerate(terms):
                    if k == 0:
                        torch.mul(draw(k), coef, out=total)
                    else:
                        axpy(total, draw(k), coef)
                target.add_(total)
            else:
                for k, (_, coef, _) in enumerate(terms):
                    axpy(target, draw(k), coef)

    def kernel(
        self, kernels: ModuleType, out: torch.Tensor, base: torch.Tensor, seeds: list[int], coefs: list, scales: None
    ) -> None:
        """One fused pass ``out = base + sum_k coefs[k] z(seeds[k])`` of ``kernels``."""
        kernels.dense_pass(out, base, seeds, coefs, offset=self.flat.offset)

    # reading and writing theta itself
    def copy_master_to_work(self) -> None:
        self.flat.work.copy_(self.flat.master)

    def gather(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.clone()

    def pull(self, theta: torch.Tensor, anchor: torch.Tensor, weight: float) -> None:
        # (1 - w) theta + w anchor  ==  theta - w (theta - anchor)
        theta.mul_(1.0 - weight).add_(anchor, alpha=weight)


class Masked:
    """The sorted flat coordinates ``mask``; z on the mask is gathered once per direction and kept
    for the passes of a step (``direction_cache_size`` directions), and passes work through the
    mask in slices of ``chunk`` coordinates, so their temporaries stay small.  Coordinates outside
    the mask are never written.  ``blocks``: (start, end, first, last) of each block of z a
    pass draws, with the slice [first, last) of the mask inside it."""

    def __init__(
        self,
        flat: FlatParameters,
        mask: torch.Tensor,
        perturb_scales: torch.Tensor | None,
        update_scales: torch.Tensor | None,
        blocks: list[tuple[int, int, int, int]],
    ):
        self.flat, self.mask, self.blocks = flat, mask, blocks
        self.perturb_scales, self.update_scales = perturb_scales, update_scales
        self._z: OrderedDict[int, torch.Tensor] = OrderedDict()

    @classmethod
    def on(
        cls,
        flat: FlatParameters,
        indices: torch.Tensor,
        perturb_scales: torch.Tensor | None,
        update_scales: torch.Tensor | None,
    ) -> Masked:
        """The mask ``indices`` (checked, on the buffer's device) with its scales in z's dtype."""
        to = dict(device=flat.device, dtype=flat.z_dtype)
        perturb_scales = None if perturb_scales is None else perturb_scales.to(**to)
        update_scales = None if update_scales is None else update_scales.to(**to)
        # Which masked coordinates fall in each block of z: found once here (one host sync),
        # not in every pass.
        ranges = flat._pass_ranges()
        edges = [lo for lo, _ in ranges] + [flat.numel]
        bounds = torch.searchsorted(indices, torch.tensor(edges, device=flat.device)).tolist()
        blocks = [(lo, hi, bounds[i], bounds[i + 1]) for i, (lo, hi) in enumerate(ranges)]
        return cls(flat, indices, perturb_scales, update_scales, blocks)

    def to(self, device: torch.device) -> Masked:
        """This mask and its scales on ``device`` (the cached z stays behind)."""

        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        mask = self.mask.to(device, non_blocking=True)
        return Masked(self.flat, mask, moved(self.perturb_scales), moved(self.update_scales), self.blocks)

    def direction(self, seed: int) -> torch.Tensor:
        """z(seed) at the masked coordinates, cached for the passes of the step; do not modify it."""
        if seed in self._z:
            self._z.move_to_end(seed)
            return self._z[seed]
        flat = self.flat
        out = torch.empty(self.mask.numel(), dtype=flat.z_dtype, device=flat.device)
        for (start, _, lo, hi), (_, _, draw) in zip(self.blocks, flat._blocks([seed])):
            z = draw(0)
            if hi > lo:
                torch.index_select(z, 0, self.mask[lo:hi] - start, out=out[lo:hi])
        self._z[seed] = out
        while len(self._z) > max(flat.direction_cache_size, 1):
            self._z.popitem(last=False)
        return out

    def _slices(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(a, b, mask[a:b]) over the mask in slices of at most ``chunk`` coordinates."""
        chunk = self.flat.chunk
        for a in range(0, self.mask.numel(), chunk):
            b = min(a + chunk, self.mask.numel())
            yield a, b, self.mask[a:b]

    @staticmethod
    def _scaled(z: torch.Tensor, scales: torch.Tensor | None, a: int, b: int) -> torch.Tensor:
        return z[a:b] if scales is None else z[a:b] * scales[a:b]

    # the torch passes
    def perturb_work(self, term: Term) -> None:
        flat, (seed, scale, scales) = self.flat, term
        z = self.direction(seed)
        for a, b, idx in self._slices():
            moved = flat.master[idx]  # a fresh gather
            moved.add_(self._scaled(z, scales, a, b), alpha=scale)
            flat.work.index_copy_(0, idx, moved.to(flat.work.dtype))

    def move_work(self, terms: Sequence[Term]) -> None:
        """Term by term (one masked z alive at a time), in z's dtype, rounded once per term."""
        flat = self.flat
        for seed, coef, scales in terms:
            z = self.direction(seed)
            for a, b, idx in self._slices():
                moved = flat.work[idx].to(flat.z_dtype)  # a fresh gather
                axpy(moved, self._scaled(z, scales, a, b), coef)
                flat.work.index_copy_(0, idx, moved.to(flat.work.dtype))
            del z  # let the cache drop it before the next direction is drawn

    def add_to_master(self, terms: Sequence[Term]) -> None:
        master = self.flat.master
        for seed, coef, scales in terms:
            z = self.direction(seed)
            for a, b, idx in self._slices():
                zs = self._scaled(z, scales, a, b)
                if isinstance(coef, torch.Tensor):
                    master.index_add_(0, idx, zs * coef)
                else:
                    master.index_add_(0, idx, zs, alpha=coef)
            del z

    def kernel(
        self,
        kernels: ModuleType,
        out: torch.Tensor,
        base: torch.Tensor,
        seeds: list[int],
        coefs: list,
        scales: torch.Tensor | None,
    ) -> None:
        """One fused pass ``out = base + sum_k coefs[k] z(seeds[k])`` (times ``scales``) on the mask."""
        kernels.masked_pass(out, base, self.mask, seeds, coefs, offset=self.flat.offset, scales=scales)

    # reading and writing theta itself
    def copy_master_to_work(self) -> None:
        """Only the masked coordinates can differ (nothing else is ever written): O(mask), not O(parameters)."""
        flat = self.flat
        for _, _, idx in self._slices():
            flat.work.index_copy_(0, idx, flat.master[idx].to(flat.work.dtype))

    def gather(self, theta: torch.Tensor) -> torch.Tensor:
        return theta[self.mask].clone()

    def pull(self, theta: torch.Tensor, anchor: torch.Tensor, weight: float) -> None:
        pulled = theta[self.mask].mul_(1.0 - weight).add_(anchor, alpha=weight)
        theta.index_copy_(0, self.mask, pulled)


Support = Dense | Masked


# -- how a pass runs --------------------------------------------------------------------------
class Fused:
    """The passes of ``support`` as fused kernels, z drawn in registers (one kernel per distinct
    scales: a masked pass may mix perturbation and update scales).  ``kernels``: the Triton
    kernels (``dpzo.zo.kernels``) or the compiled CPU passes (``dpzo.zo.cpu_kernels``), which
    offer the same ``dense_pass`` and ``masked_pass``."""

    def __init__(self, support: Support, kernels: ModuleType):
        self.support, self.kernels = support, kernels

    def perturb_work(self, term: Term) -> None:
        self._run(self.support.flat.work, self.support.flat.master, [term])

    def move_work(self, terms: Sequence[Term]) -> None:
        self._run(self.support.flat.work, self.support.flat.work, terms)

    def add_to_master(self, terms: Sequence[Term]) -> None:
        self._run(self.support.flat.master, self.support.flat.master, terms)

    def _run(self, out: torch.Tensor, base: torch.Tensor, terms: Sequence[Term]) -> None:
        for scales, seeds, coefs in groups_by_scales(terms):
            self.support.kernel(self.kernels, out, base, seeds, coefs, scales)


# -- how theta is held ------------------------------------------------------------------------
class InPlace:
    """theta lives in ``work`` itself, which costs no memory beyond inference.  Restore, update
    and the next perturbation are merged into one pass ``work += (beta - eta g) z_t + beta z_{t+1}``;
    as in the released code, a restore is exact only up to rounding (float32: about 1e-7 of
    beta z per step)."""

    in_place = True

    def __init__(self, flat: FlatParameters):
        self.flat = flat
        self.applied: list[Term] = []  # what work holds on top of theta
        self.pending: list[Term] = []  # moves of theta not yet written to work

    @property
    def restored(self) -> bool:
        return not self.applied and not self.pending

    def perturb(self, term: Term) -> None:
        self._write(self._undo() + self.pending + [term])
        self.applied, self.pending = [term], []

    def restore(self) -> None:
        self._write(self._undo() + self.pending)
        self.forget()

    def add(self, terms: list[Term]) -> None:
        """Merged into the next pass over ``work``."""
        self.pending.extend(terms)

    def settle(self) -> None:
        """Make the master (the weights) equal theta: the pending moves are written now."""
        self.restore()

    def master_written(self) -> None:
        """theta was changed in the master, which is the weights: nothing lags behind."""

    def loaded(self) -> None:
        """theta was loaded into the master, which is the weights."""
        self.forget()

    def forget(self) -> None:
        self.applied, self.pending = [], []

    def _undo(self) -> list[Term]:
        return [(s, -c, sc) for s, c, sc in self.applied]

    def _write(self, terms: list[Term]) -> None:
        terms = merge_terms(terms)
        if terms:
            self.flat._passes.move_work(terms)


class MasterCopy:
    """theta in a separate master (float32 by default, float64 in tests): a perturbation writes
    ``work = master + s z``, so the restore is exact and free (the next perturbation overwrites
    ``work`` anyway), and the update lands in the master's precision."""

    in_place = False

    def __init__(self, flat: FlatParameters):
        self.flat = flat
        self.perturbed = False  # work holds a perturbation
        self.stale = False  # work lags behind the master

    @property
    def restored(self) -> bool:
        return not self.perturbed and not self.stale

    def perturb(self, term: Term) -> None:
        self.flat._passes.perturb_work(term)
        self.perturbed, self.stale = True, False

    def restore(self) -> None:
        if self.perturbed or self.stale:
            self.flat._support.copy_master_to_work()
        self.forget()

    def add(self, terms: list[Term]) -> None:
        """All directions in one pass over the master."""
        terms = merge_terms(terms)
        if terms:
            self.flat._passes.add_to_master(terms)
        self.stale = True

    def settle(self) -> None:
        """The master is theta already."""

    def master_written(self) -> None:
        self.stale = True

    def loaded(self) -> None:
        self.flat.work.copy_(self.flat.master)
        self.forget()

    def forget(self) -> None:
        self.perturbed = self.stale = False


Holding = InPlace | MasterCopy
