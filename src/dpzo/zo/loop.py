"""The training loop of the zeroth-order methods.

Which method does what (``dpzo.methods.ZO`` holds the table):

* ``mezo``          non-private reference: a fixed-size batch drawn uniformly without
                    replacement each step (public seed), mean of the raw per-example
                    differences, constant learning rate and ZO scale.
* ``dp-zoso``       Poisson sampling with rate q = B/n from the secret RNG (what the
                    accountant assumes), per-example clipping of the finite-difference
                    quotient, Gaussian noise on the sum, division by the expected batch size
                    q*n, and the stagewise schedule of
                    ``dpzo.methods.hyperparameters.StageSchedule``.
* ``dpzero``        the same release with a constant schedule (Zhang et al. 2024).
* ``dp-zo-gauss``,  Tang et al. 2024: the raw loss difference l+ - l- is clipped (C ~ 0.05),
  ``dp-zo-laplace`` noised (Gaussian, or Laplace for pure eps-DP) and only then divided by
                    2 beta, so the clip does not depend on beta.

The noise added is the one :func:`ledger.verify_ledger` certified for the cell before its first
step (the ledger's identity, counts and the ε of its noise, recomputed).

Exactly ``steps`` updates run, each with ``directions`` releases; the trainer counts what really
ran (steps, releases, examples sampled, the noise it added) and checks that count against the
ledger again at the end (:func:`ledger.check_ledger_after`).

The loop itself only sequences the pieces: the stage boundaries (restore, mask, anchor), the
step (:func:`dpzo.zo.step.zo_step`), the bookkeeping (:class:`dpzo.zo.monitor.TrainingMonitor`:
non-finite flags, log lines, counts), the test-loss curve and the snapshots
(:mod:`dpzo.zo.checkpoint`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from dpzo.methods import ZO, base_method
from dpzo.methods.base import ZOMethod
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.models.evaluate import TestLossCurve
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.checkpoint import LoopState, TrainingCheckpoint
from dpzo.zo.flat import direction_seed
from dpzo.zo.monitor import TrainingMonitor
from dpzo.zo.precision import check_zo_scale
from dpzo.zo.replicas import SingleProcess
from dpzo.zo.step import SINGLE_PROCESS, batch_sampler, zo_step
from dpzo.zo.store import ParameterStore, build_store

if TYPE_CHECKING:  # annotations only: masks are built above this layer and passed in
    from dpzo.masks.settings import Mask


log = logging.getLogger(__name__)


def train_zo(
    model: torch.nn.Module,
    per_example_loss: Callable[[np.ndarray], torch.Tensor],
    n: int,
    hp: ZOHyperparameters,
    *,
    method: str,
    run_seed: int,
    noise: NoisySum | None = None,
    secret: SecretRandom | None = None,
    master_dtype: torch.dtype | None = torch.float32,
    masks: Callable[[int], Mask] | None = None,
    record_releases: bool = False,
    checkpoint: TrainingCheckpoint | None = None,
    curve: TestLossCurve | None = None,
    on_start: Callable[[int | None], None] | None = None,
    team: SingleProcess = SINGLE_PROCESS,
    parts: list[list[str]] | None = None,
    store: ParameterStore | None = None,
) -> dict:
    """Run ``hp.steps`` zeroth-order steps on ``model`` in place; returns the training history.

    ``per_example_loss(index)`` returns the [len(index)] losses of the training examples
    ``index`` at the model's current weights (one batched forward).  Private methods need
    ``noise`` (from the ledger) and the secret RNG that samples batches and draws the noise.
    Masked methods need ``masks(stage)``: the mask to train during that stage, asked for at the
    start of each stage.  ``record_releases`` keeps every released scalar, in order, in
    ``history["released"]`` (they are the public output of the mechanism; the privacy audit
    compares them with its own run of the mechanism; not kept across a resume).  With
    ``checkpoint`` the loop continues from the cell's snapshot when there is one and writes new
    ones as its policy says (``dpzo.zo.checkpoint``).  ``curve`` adds the test-loss points to the
    history (``evaluate.TestLossCurve``).  ``on_start(step)`` is called once before the first
    step, with the step a snapshot resumed after (None: from step 0); it may raise to refuse the
    run (``dpzo.pipeline.cellguard``).

    ``team``: the replicas of a data-parallel run (``dpzo.zo.replicas.Replicas``).  Rank 0
    holds ``secret``, draws the batches and releases; every rank computes its share of each
    batch and applies the same update.  Every rank resumes from the snapshot; rank 0 alone
    writes them.  A rank that stops answering ends the run with ``ReplicaLost``.

    ``store``: where theta lives (``dpzo.zo.store.ParameterStore``) when the caller built it
    (a streamed model's is built before the model is used at all); otherwise
    ``dpzo.zo.store.build_store`` builds it from ``master_dtype``: one buffer, or one per
    device of a placed model; ``parts`` (lists of parameter names) cuts the vector by hand
    instead, as the tests do.
    """
    spec = _checked_method(method, n, hp, noise=noise, secret=secret, masked=masks is not None, main=team.is_main)
    schedule = hp.schedule()
    starts = set(schedule.stage_starts())
    if store is None:
        store = build_store(model, master_dtype=master_dtype, directions=hp.directions, parts=parts)
    check_zo_scale(store, min(schedule.beta_at(s) for s in range(hp.stages)))
    public_rng = np.random.default_rng([int(run_seed), 1])  # mezo's batches: no privacy claim
    sample = batch_sampler(spec, n, hp.batch_size, secret=secret, public_rng=public_rng)
    monitor = TrainingMonitor(
        schedule,
        store,
        steps=hp.steps,
        log_every=hp.log_every,
        private=spec.private,
        record_releases=record_releases,
        log=log,
    )
    snapshots = _Snapshots(checkpoint, store, monitor, public_rng=public_rng, secret=secret, team=team)
    anchor = snapshots.resume(on_start)
    step_with = functools.partial(
        zo_step, spec, store, per_example_loss, sample, clip=hp.clip, lam=hp.lam, noise=noise, secret=secret, team=team
    )
    monitor.start()
    for step in range(monitor.steps_run, hp.steps):
        stage = schedule.stage_of(step)
        if step in starts:
            anchor = _start_stage(store, stage, hp, masks=masks, monitor=monitor, anchor=anchor)
        seeds = [direction_seed(run_seed, step, p) for p in range(hp.directions)]
        result = step_with(seeds, lr=schedule.lr_at(stage), beta=schedule.beta_at(stage), anchor=anchor)
        monitor.after_step(step, stage, result)
        if curve is not None:
            curve.after_step(step + 1, monitor.history, prepare=store.restore)
        snapshots.step_done(step, anchor)
    store.restore()
    return _finish(monitor, spec, n, hp, noise)


def _start_stage(
    store: ParameterStore,
    stage: int,
    hp: ZOHyperparameters,
    *,
    masks: Callable[[int], Mask] | None,
    monitor: TrainingMonitor,
    anchor: torch.Tensor | None,
) -> torch.Tensor | None:
    """The start of ``stage``: its mask, and its anchor theta_s when the pull is on (a real copy
    taken now); returns the anchor the stage's steps pull toward."""
    store.restore()  # the weights are read here (dynamic masks, the anchor)
    if masks is not None:
        monitor.stage_started(_train_mask(store, masks(stage), hp))
    return store.snapshot() if hp.lam else anchor


def _finish(monitor: TrainingMonitor, spec: ZOMethod, n: int, hp: ZOHyperparameters, noise: NoisySum | None) -> dict:
    """The history, with the public constants the ledger is checked against at the end."""
    private = spec.private  # the noise the ledger certified; MeZO divides by its batch size
    return monitor.finish(
        n=n,
        sampling_rate=hp.batch_size / n,
        noise_scale_on_sum=noise.scale if private else 0.0,
        noise_divisor=noise.divisor if private else float(hp.batch_size),
    )


class _Snapshots:
    """The run's snapshots (``checkpoint``, may be None): where it resumes, and those it writes
    (rank 0 alone) after each step as the policy says."""

    def __init__(
        self,
        checkpoint: TrainingCheckpoint | None,
        store: ParameterStore,
        monitor: TrainingMonitor,
        *,
        public_rng: np.random.Generator,
        secret: SecretRandom | None,
        team: SingleProcess,
    ):
        self.checkpoint, self.store, self.monitor = checkpoint, store, monitor
        self.public_rng, self.secret, self.team = public_rng, secret, team

    def resume(self, on_start: Callable[[int | None], None] | None) -> torch.Tensor | None:
        """Continue from the snapshot if there is one (theta, the generators, the monitor), tell
        ``on_start`` the step resumed after; returns the anchor the snapshot holds (None: none)."""
        resumed = _resume(self.checkpoint, self.store, public_rng=self.public_rng, secret=self.secret, team=self.team)
        if resumed is not None:
            self.monitor.load_state_dict(resumed.monitor_state())
        if on_start is not None:
            on_start(None if resumed is None else resumed.step)
        return None if resumed is None else resumed.anchor

    def step_done(self, step: int, anchor: torch.Tensor | None) -> None:
        """Step ``step`` (0-based) ran: a snapshot if the policy asks for one now."""
        if self.checkpoint is None or not self.team.is_main:  # rank 0 writes the snapshots
            return
        self.checkpoint.step_done(
            step + 1,
            lambda: LoopState(anchor=anchor, **self.monitor.state_dict()),
            self.store,
            public_rng=self.public_rng,
            secret=self.secret,
        )


def _resume(
    checkpoint: TrainingCheckpoint | None,
    store: ParameterStore,
    *,
    public_rng: np.random.Generator,
    secret: SecretRandom | None,
    team: SingleProcess,
) -> LoopState | None:
    """The snapshot this run continues from (None: from step 0), the same on every rank.

    Rank 0's secret RNG decides whether the run is in test mode (part of the snapshot's
    identity), and rank 0 alone (which holds the cell's attempt log) decides whether the snapshot
    is resumed; the other ranks then load it too and check that they resumed after the same step.
    """
    if checkpoint is None:
        return None
    secure = team.broadcast_flag(None if secret is None else secret.is_secure)
    resumed = None
    if team.is_main:
        resumed = checkpoint.resume(store, public_rng=public_rng, secret=secret, secure_noise=secure)
    if team.broadcast_flag(resumed is not None) and not team.is_main:
        resumed = checkpoint.resume(store, public_rng=public_rng, secret=secret, secure_noise=secure)
    team.agree(-1 if resumed is None else resumed.step)
    return resumed


def _checked_method(
    method: str,
    n: int,
    hp: ZOHyperparameters,
    *,
    noise: NoisySum | None,
    secret: SecretRandom | None,
    masked: bool,
    main: bool = True,
) -> ZOMethod:
    """The zeroth-order method ``method`` names, after refusing settings it cannot run with."""
    method = base_method(method)
    spec = ZO.get(method)
    if spec is None:
        raise ValueError(f"train_zo runs the zeroth-order methods {tuple(ZO)}, not {method!r}")
    if spec.masked != masked:
        raise ValueError(f"{method}: masks are {'required' if spec.masked else 'not used'}")
    if hp.batch_size > n:
        raise ValueError(f"batch_size {hp.batch_size} is larger than the training set ({n} examples)")
    if spec.private and (noise is None or (main and secret is None)):
        raise ValueError("a private method needs the ledger's noise, and its rank 0 the secret RNG")
    if spec.private and math.isinf(hp.clip):
        raise ValueError(f"{method} needs a finite clip")
    return spec


def _train_mask(store: ParameterStore, mask: Mask, hp: ZOHyperparameters) -> int:
    """Restrict training to ``mask`` (its scales on the perturbation, and on the update in
    ``rank_update`` mode); returns its size."""
    rank_update = hp.mask is not None and hp.mask.rank_update
    store.set_mask(mask.indices, perturb_scales=mask.scales, update_scales=mask.scales if rank_update else None)
    return len(mask)
