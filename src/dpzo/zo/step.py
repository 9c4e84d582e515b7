"""The pieces of one zeroth-order step: two-point differences, the clip, the update."""

from __future__ import annotations
from dpzo.zo.flat import Coefficient, FlatParameters

import math
from typing import Callable, Sequence
import torch
from dpzo.methods.hyperparameters import StageSchedule  # noqa: F401 (the schedule of a ZO run; lives with the settings)


@torch.no_grad()
def spsa_differences(
    loss_fn: Callable[[], torch.Tensor], flat: FlatParameters, seed: int, beta: float, *, restore: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example symmetric finite differences (l(theta+beta z) - l(theta-beta z)) / (2 beta).

    ``loss_fn`` returns the [B] per-example losses of one batched forward at the current
    working weights.  Returns (d in float64, losses at +beta, losses at -beta), all on the
    losses' device.  With ``restore`` the working weights are restored afterwards; the trainer
    passes False and lets the next pass overwrite them.
    """
    flat.perturb(seed, +beta)
    loss_plus = loss_fn()
    flat.perturb(seed, -beta)
    loss_minus = loss_fn()
    if restore:
        flat.restore()
    return (loss_plus.double() - loss_minus.double()) / (2.0 * beta), loss_plus, loss_minus


def clip_differences(d: torch.Tensor, clip: float) -> torch.Tensor:
    """Clip each per-example scalar to [-C, C] (C = inf: no clipping)."""
    if math.isinf(clip):
        return d
    return d.clamp(-clip, clip)


@torch.no_grad()
def apply_update(
    flat: FlatParameters,
    seeds: list[int],
    grads: Sequence[Coefficient],
    *,
    lr: float,
    lam: float = 0.0,
    anchor: torch.Tensor | None = None,
    restore: bool = True,
) -> None:
    """theta <- theta - lr * ( mean_p g_p z_p + lam (theta - anchor) ), then (``restore``) work <- theta.

    The pull toward the anchor is a plain gradient step of the proximal term; it uses theta
    before the ZO move (both terms are evaluated at theta_t).  ``grads`` may be 0-d tensors on
    the device (then the update never waits for the host).
    """
    if lam:
        if anchor is None:
            raise ValueError("lam > 0 needs the stage anchor")
        flat.pull_toward(anchor, lr * lam)
    scale = -lr / len(seeds)
    flat.add_directions(
        [(seed, g * scale if isinstance(g, torch.Tensor) else scale * float(g)) for seed, g in zip(seeds, grads)]
    )
    if restore:
        flat.restore()
