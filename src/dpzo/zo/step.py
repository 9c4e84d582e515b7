"""One zeroth-order step (:func:`zo_step`) and its pieces: two-point differences, the clip, the update.

A step of a method with P directions, at learning rate eta and ZO scale beta::

    for each direction p (its own batch, its own release):
        B_p = a batch                 Poisson(q = B/n) from the secret RNG; MeZO: B of n, public
        d_i = (l_i(theta + beta z_p) - l_i(theta - beta z_p)) / (2 beta)          i in B_p
        g_p = release(d)              the method's rule, e.g. (sum_i clip_C(d_i) + noise) / (q n)
    theta <- theta - eta ( (1/P) sum_p g_p z_p + lam (theta - theta_s) )
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpzo.zo.flat import Coefficient, FlatParameters
from dpzo.zo.replicas import SingleProcess

if TYPE_CHECKING:  # annotations only
    from dpzo.methods.base import ZOMethod
    from dpzo.privacy.mechanisms import NoisySum
    from dpzo.privacy.secret import SecretRandom


SINGLE_PROCESS = SingleProcess()


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


def _losses_of(
    per_example_loss: Callable[[np.ndarray], torch.Tensor], index: np.ndarray, device: torch.device
) -> Callable[[], torch.Tensor]:
    """The losses of this replica's share; a share may be empty when the batch is smaller than the ranks."""
    if len(index) == 0:
        return lambda: torch.zeros(0, dtype=torch.float64, device=device)
    return lambda: per_example_loss(index)


def _two_point_losses(
    flat: FlatParameters,
    per_example_loss: Callable[[np.ndarray], torch.Tensor],
    passes: Sequence[tuple[np.ndarray, int]],
    beta: float,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(d, l+, l-) for each (batch share, seed): one streamed pass for all of them, or two
    forwards each on a resident model."""
    if hasattr(flat, "two_point_losses"):  # dpzo.zo.streamed.StreamedParameters
        return flat.two_point_losses(per_example_loss, passes, beta)
    return [
        spsa_differences(_losses_of(per_example_loss, index, flat.device), flat, seed, beta, restore=False)
        for index, seed in passes
    ]


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


def batch_sampler(
    spec: ZOMethod, n: int, batch_size: int, *, secret: SecretRandom | None, public_rng: np.random.Generator
) -> Callable[[], np.ndarray]:
    """How the method ``spec`` draws a batch of ``range(n)``: ``sample()`` returns its indices.

    A private method samples each example with probability q = batch_size / n from the secret
    RNG (Poisson sampling: what the accountant assumes, so the size is random and may be 0).
    MeZO, with no privacy claim, draws ``batch_size`` examples without replacement from the
    public generator.
    """
    if spec.private:
        q = batch_size / n
        return lambda: secret.poisson_batch(n, q)
    return lambda: public_rng.choice(n, size=batch_size, replace=False)


@dataclass
class StepResult:
    """What one step did, per direction, for the monitor; tensors stay on the device."""

    seeds: list[int] = field(default_factory=list)
    grads: list[Coefficient] = field(default_factory=list)  # the released scalars g_p, one per direction
    differences: list[torch.Tensor] = field(default_factory=list)  # the per-example quotients d, per direction
    losses: list[torch.Tensor] = field(default_factory=list)  # mean of l+ and l- (non-empty batches only)
    examples: list[int] = field(default_factory=list)  # batch sizes, one per release
    clipped: list[Any] = field(default_factory=list)  # examples the clip changed, per release


def zo_step(
    spec: ZOMethod,
    flat: FlatParameters,
    per_example_loss: Callable[[np.ndarray], torch.Tensor],
    sample: Callable[[], np.ndarray],
    seeds: Sequence[int],
    *,
    lr: float,
    beta: float,
    clip: float,
    lam: float = 0.0,
    anchor: torch.Tensor | None = None,
    noise: NoisySum | None = None,
    secret: SecretRandom | None = None,
    team: SingleProcess = SINGLE_PROCESS,
) -> StepResult:
    """One step of the method ``spec``, one direction z(seed) per seed (the module docstring).

    For each group of directions (``spec.release_groups``: each direction alone, or all of them
    for DP-AggZO): a batch (``sample()``, see :func:`batch_sampler`), the per-example two-point
    differences along each z(seed) (:func:`spsa_differences`), their release
    (``spec.release_group``: clip, sum, the ledger's ``noise`` from ``secret``, / q n; MeZO: the
    mean); then the update
    with the pull toward ``anchor`` (:func:`apply_update`).  No value is read on the host, and
    the perturbed weights are left for the next pass to overwrite (``flat.restore()`` before
    reading them).  ``team``: the replicas of a data-parallel run (``dpzo.zo.replicas``): rank 0
    draws the batch and releases, every rank computes its share's differences and updates.
    """
    done = StepResult()
    groups = spec.release_groups(list(seeds))  # one batch and one release per group
    # Every batch of the step is drawn before any noise: a streamed model (``dpzo.zo.streamed``)
    # computes all of the step's differences in one pass, and the resident one draws alike.
    batches = [team.draw(sample) for _ in groups]  # rank 0 draws; each replica takes its share
    passes = [(index, seed) for (index, size), group in zip(batches, groups) if size for seed in group]
    computed = iter(_two_point_losses(flat, per_example_loss, passes, beta))
    for group, (_, batch_size) in zip(groups, batches):
        ds = []
        for _ in group:
            if batch_size == 0:  # a Poisson batch may be empty: its release is the noise alone
                ds.append(torch.zeros(0, dtype=torch.float64, device=flat.device))
                continue
            d_share, loss_plus, loss_minus = next(computed)
            # the whole batch's quotients (and l+ + l- for the log), in batch order
            d, loss_sums = team.gather(d_share, loss_plus + loss_minus, batch_size)
            done.losses.append(0.5 * loss_sums.mean())
            ds.append(d)
        release = lambda: spec.release_group(ds, clip=clip, beta=beta, noise=noise, secret=secret)  # noqa: B023, E731
        grads, clipped = team.from_main(release)  # the rank holding the secret RNG releases
        done.seeds.extend(group)
        done.grads.extend(grads)
        done.differences.extend(ds)
        done.examples.append(batch_size)
        done.clipped.append(clipped)
    apply_update(flat, done.seeds, done.grads, lr=lr, lam=lam, anchor=anchor, restore=False)
    return done
