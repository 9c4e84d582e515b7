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

from dpzo.zo.passes import Coefficient
from dpzo.zo.replicas import BatchSampler, SingleProcess
from dpzo.zo.store import ParameterStore

if TYPE_CHECKING:  # annotations only
    from dpzo.methods.base import ZOMethod
    from dpzo.privacy.mechanisms import NoisySum
    from dpzo.privacy.secret import SecretRandom


SINGLE_PROCESS = SingleProcess()


def clip_differences(d: torch.Tensor, clip: float) -> torch.Tensor:
    """Clip each per-example scalar to [-C, C] (C = inf: no clipping)."""
    if math.isinf(clip):
        return d
    return d.clamp(-clip, clip)


@torch.no_grad()
def apply_update(
    store: ParameterStore,
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
        store.pull_toward(anchor, lr * lam)
    scale = -lr / len(seeds)
    store.add_directions(
        [(seed, g * scale if isinstance(g, torch.Tensor) else scale * float(g)) for seed, g in zip(seeds, grads)]
    )
    if restore:
        store.restore()


def batch_sampler(
    spec: ZOMethod, n: int, batch_size: int, *, secret: SecretRandom | None, public_rng: np.random.Generator
) -> BatchSampler:
    """How the method ``spec`` draws a batch of ``range(n)``: ``sample()`` returns its indices.

    A private method samples each example with probability q = batch_size / n from the secret
    RNG (Poisson sampling: what the accountant assumes, so the size is random and may be 0).
    MeZO, with no privacy claim, draws ``batch_size`` examples without replacement from the
    public generator.  The sampler says which (``size``), so that ranks other than the drawing
    one rebuild the batch without being sent its size (``dpzo.zo.replicas``).
    """
    if spec.private:
        q = batch_size / n
        return BatchSampler(lambda: secret.poisson_batch(n, q), n)
    return BatchSampler(lambda: public_rng.choice(n, size=batch_size, replace=False), n, size=batch_size)


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
    store: ParameterStore,
    per_example_loss: Callable[[np.ndarray], torch.Tensor],
    sample: BatchSampler,
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
    differences along each z(seed) (``store.two_point_losses``), their release
    (``spec.release_group``: clip, sum, the ledger's ``noise`` from ``secret``, / q n; MeZO: the
    mean); then the update
    with the pull toward ``anchor`` (:func:`apply_update`).  No value is read on the host, and
    the perturbed weights are left for the next pass to overwrite (``store.restore()`` before
    reading them).  ``team``: the replicas of a data-parallel run (``dpzo.zo.replicas``): rank 0
    draws the batch and releases, every rank computes its share's differences and updates.
    """
    done = StepResult()
    groups = spec.release_groups(list(seeds))  # one batch and one release per group
    # Every batch of the step is drawn before any noise: a streamed model (``dpzo.zo.streamed``)
    # computes all of the step's differences in one pass, and the resident one draws alike.
    batches = [team.draw(sample) for _ in groups]  # rank 0 draws; each replica takes its share
    passes = [(index, seed) for (index, size), group in zip(batches, groups) if size for seed in group]
    computed = iter(store.two_point_losses(per_example_loss, passes, beta))
    for group, (_, batch_size) in zip(groups, batches):
        ds = []
        for _ in group:
            if batch_size == 0:  # a Poisson batch may be empty: its release is the noise alone
                ds.append(torch.zeros(0, dtype=torch.float64, device=store.device))
                continue
            d_share, loss_plus, loss_minus = next(computed)
            # the whole batch's quotients (and l+ + l- for the log), in batch order
            d, loss_sums = team.gather(d_share, loss_plus + loss_minus, batch_size)
            done.losses.append(0.5 * loss_sums.mean())
            ds.append(d)
        release = lambda: spec.release_group(ds, clip=clip, beta=beta, noise=noise, secret=secret)  # noqa: B023, E731
        grads, clipped = team.from_main(release, len(group))  # the rank holding the secret RNG releases
        done.seeds.extend(group)
        done.grads.extend(grads)
        done.differences.extend(ds)
        done.examples.append(batch_size)
        done.clipped.append(clipped)
    apply_update(store, done.seeds, done.grads, lr=lr, lam=lam, anchor=anchor, restore=False)
    return done
