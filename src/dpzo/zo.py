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

Design: every trainable parameter is re-pointed into one flat working buffer (the model's
dtype), and a separate master copy holds theta.  A perturbation writes ``work = master + s z``,
so restoring is a copy and is bit-exact; the update is applied to the master in its own (higher)
precision.  z is drawn from a dedicated ``torch.Generator`` in fixed-size chunks, so the same
seed regenerates exactly the same z for the perturbation and for the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

DIRECTION_CHUNK = 1 << 22  # elements of z materialised at a time


def direction_seed(run_seed: int, step: int, direction: int) -> int:
    """Public seed of z for (step, direction): a hash of the run seed, reproducible and spread out."""
    state = np.random.SeedSequence([int(run_seed), int(step), int(direction)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def gaussian_chunks(seed: int, numel: int, *, dtype: torch.dtype, device: torch.device, chunk: int = DIRECTION_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset, z[offset:offset+len]) of a standard normal vector determined by ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        yield start, torch.randn(n, generator=gen, dtype=dtype, device=device)


def gaussian_direction(seed: int, numel: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """The whole direction z for a seed (for tests and small models)."""
    out = torch.empty(numel, dtype=dtype, device=device)
    for start, z in gaussian_chunks(seed, numel, dtype=dtype, device=torch.device(device)):
        out[start : start + z.numel()] = z
    return out


class FlatParameters:
    """The model's trainable parameters as views into one flat buffer, plus a master copy.

    ``work`` is what the model computes with (its own dtype); ``master`` holds theta in
    ``master_dtype`` (float32 by default, float64 in tests).  Tied parameters appear once
    because ``named_parameters`` de-duplicates them.
    """

    def __init__(self, model: torch.nn.Module, master_dtype: torch.dtype | None = torch.float32):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters")
        first = self.params[0][1]
        self.device = first.device
        self.numel = sum(p.numel() for _, p in self.params)
        self.work = torch.empty(self.numel, dtype=first.dtype, device=self.device)
        offset = 0
        with torch.no_grad():
            for _, p in self.params:
                n = p.numel()
                self.work[offset : offset + n].copy_(p.reshape(-1))
                p.data = self.work[offset : offset + n].view_as(p)
                offset += n
        self.master = self.work.to(master_dtype or first.dtype, copy=True)

    # -- the trainable support ------------------------------------------------------------
    def set_mask(self, indices: torch.Tensor | None, perturb_scales: torch.Tensor | None = None, update_scales: torch.Tensor | None = None) -> None:
        """Restrict perturbation and update to the flat coordinates ``indices`` (None: dense).

        ``indices`` are sorted unique int64 flat indices; z at a masked coordinate is the dense
        z at that coordinate, so a mask selects from the same direction a dense run would use.
        Optional per-coordinate scales multiply the perturbation (``rank`` mode) and the update.
        Coordinates outside the mask are never written: they stay bit-identical.
        """
        if indices is None:
            self.mask = self.perturb_scales = self.update_scales = None
            return
        indices = indices.to(device=self.device, dtype=torch.long)
        if indices.numel() == 0 or bool((indices[1:] <= indices[:-1]).any()) or int(indices[0]) < 0 or int(indices[-1]) >= self.numel:
            raise ValueError("mask indices must be non-empty, sorted, unique and inside the parameter vector")
        self.restore()
        self.mask = indices
        to = dict(device=self.device, dtype=self.master.dtype)
        self.perturb_scales = None if perturb_scales is None else perturb_scales.to(**to)
        self.update_scales = None if update_scales is None else update_scales.to(**to)

    mask: torch.Tensor | None = None
    perturb_scales: torch.Tensor | None = None
    update_scales: torch.Tensor | None = None

    def direction(self, seed: int) -> torch.Tensor:
        """z(seed) on the trainable support: the whole vector, or its masked coordinates."""
        if self.mask is None:
            return gaussian_direction(seed, self.numel, dtype=self.master.dtype, device=self.device)
        out = torch.empty(self.mask.numel(), dtype=self.master.dtype, device=self.device)
        for start, z in gaussian_chunks(seed, self.numel, dtype=self.master.dtype, device=self.device):
            lo, hi = torch.searchsorted(self.mask, torch.tensor([start, start + z.numel()], device=self.device)).tolist()
            out[lo:hi] = z[self.mask[lo:hi] - start]
        return out

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """work <- master + scale * z(seed) on the support."""
        if self.mask is None:
            for start, z in gaussian_chunks(seed, self.numel, dtype=self.master.dtype, device=self.device):
                end = start + z.numel()
                self.work[start:end].copy_(torch.add(self.master[start:end], z, alpha=scale))
            return
        z = self.direction(seed)
        if self.perturb_scales is not None:
            z = z * self.perturb_scales
        moved = torch.add(self.master[self.mask], z, alpha=scale)
        self.work.index_copy_(0, self.mask, moved.to(self.work.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """work <- master, bit-exact.

        With a mask only the masked coordinates can differ (nothing else is ever written), so
        only those are copied: the restore costs O(mask), not O(parameters).
        """
        if self.mask is None:
            self.work.copy_(self.master)
        else:
            self.work.index_copy_(0, self.mask, self.master[self.mask].to(self.work.dtype))

    @torch.no_grad()
    def add_direction(self, seed: int, coef: float) -> None:
        """master <- master + coef * z(seed) on the support (times the update scales, if any)."""
        if self.mask is None:
            for start, z in gaussian_chunks(seed, self.numel, dtype=self.master.dtype, device=self.device):
                self.master[start : start + z.numel()].add_(z, alpha=coef)
            return
        z = self.direction(seed)
        if self.update_scales is not None:
            z = z * self.update_scales
        self.master.index_add_(0, self.mask, z, alpha=coef)

    @torch.no_grad()
    def snapshot(self) -> torch.Tensor:
        """A real copy of theta on the support (the proximal anchor); never an alias."""
        return self.master.clone() if self.mask is None else self.master[self.mask].clone()

    @torch.no_grad()
    def pull_toward(self, anchor: torch.Tensor, weight: float) -> None:
        """theta <- theta - weight (theta - anchor) on the support."""
        if self.mask is None:
            # (1 - w) theta + w anchor  ==  theta - w (theta - anchor)
            self.master.mul_(1.0 - weight).add_(anchor, alpha=weight)
        else:
            pulled = self.master[self.mask].mul_(1.0 - weight).add_(anchor, alpha=weight)
            self.master.index_copy_(0, self.mask, pulled)


@torch.no_grad()
def spsa_differences(
    loss_fn: Callable[[], torch.Tensor], flat: FlatParameters, seed: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example symmetric finite differences (l(theta+beta z) - l(theta-beta z)) / (2 beta).

    ``loss_fn`` returns the [B] per-example losses of one batched forward at the current
    working weights.  Returns (d in float64, losses at +beta, losses at -beta); the working
    weights are restored exactly afterwards.
    """
    flat.perturb(seed, +beta)
    loss_plus = loss_fn()
    flat.perturb(seed, -beta)
    loss_minus = loss_fn()
    flat.restore()
    return (loss_plus.double() - loss_minus.double()) / (2.0 * beta), loss_plus, loss_minus


def clip_differences(d: torch.Tensor, clip: float) -> torch.Tensor:
    """Clip each per-example scalar to [-C, C] (C = inf: no clipping)."""
    if math.isinf(clip):
        return d
    return d.clamp(-clip, clip)


@torch.no_grad()
def apply_update(flat: FlatParameters, seeds: list[int], grads: list[float], *, lr: float, lam: float = 0.0, anchor: torch.Tensor | None = None) -> None:
    """theta <- theta - lr * ( mean_p g_p z_p + lam (theta - anchor) ), then work <- theta.

    The pull toward the anchor is a plain gradient step of the proximal term; it uses theta
    before the ZO move (both terms are evaluated at theta_t).
    """
    if lam:
        if anchor is None:
            raise ValueError("lam > 0 needs the stage anchor")
        flat.pull_toward(anchor, lr * lam)
    scale = -lr / len(seeds)
    for seed, g in zip(seeds, grads):
        flat.add_direction(seed, scale * float(g))
    flat.restore()


@dataclass(frozen=True)
class StageSchedule:
    """Stagewise schedule of DP-ZOSO.

    Stage s lasts ``stage_steps * 2**s`` steps; the last stage runs until ``steps`` (so it
    is extended or truncated); stages that would start after ``steps`` never run.  The learning
    rate is multiplied by ``lr_decay`` at each stage, and the ZO scale moves geometrically from
    ``beta_start`` (stage 0) to ``beta_end`` (stage S-1), in either direction.
    """

    steps: int
    stages: int = 1
    stage_steps: int | None = None
    lr: float = 1e-4
    lr_decay: float = 0.5
    beta_start: float = 1e-3
    beta_end: float = 1e-3

    def __post_init__(self) -> None:
        if self.steps < 0 or self.stages < 1:
            raise ValueError("steps must be >= 0 and stages >= 1")
        if self.beta_start <= 0 or self.beta_end <= 0:
            raise ValueError("beta_start and beta_end must be positive")

    def stage_starts(self) -> list[int]:
        """First step of each stage that actually runs."""
        t0 = self.stage_steps if self.stage_steps is not None else self.steps
        starts, start = [], 0
        for s in range(self.stages):
            if start >= self.steps and s > 0:
                break
            starts.append(start)
            start += t0 * 2**s
        return starts

    def stage_of(self, step: int) -> int:
        starts = self.stage_starts()
        return max(s for s, start in enumerate(starts) if start <= step)

    def lr_at(self, stage: int) -> float:
        return self.lr * self.lr_decay**stage

    def beta_at(self, stage: int) -> float:
        if self.stages == 1:
            return self.beta_start
        frac = stage / (self.stages - 1)
        return self.beta_start * (self.beta_end / self.beta_start) ** frac
