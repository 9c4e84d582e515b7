"""The training loop of the zeroth-order methods.

Which method does what (``dpzo.methods.ZO`` holds the table):

* ``mezo``          non-private reference: a fixed-size batch drawn uniformly without
                    replacement each step (public seed), mean of the raw per-example
                    differences, constant learning rate and ZO scale.
* ``dp-zoso``       Poisson sampling with rate q = B/n from the secret RNG (what the
                    accountant assumes), per-example clipping of the finite-difference
                    quotient, Gaussian noise on the sum, division by the expected batch size
                    q*n, and the stagewise schedule of ``zo.StageSchedule``.
* ``dpzero``        the same release with a constant schedule (Zhang et al. 2024).
* ``dp-zo-gauss``,  Tang et al. 2024: the raw loss difference l+ - l- is clipped (C ~ 0.05),
  ``dp-zo-laplace`` noised (Gaussian, or Laplace for pure eps-DP) and only then divided by
                    2 beta, so the clip does not depend on beta.

The noise added is the one :func:`ledger.verify_ledger` certified for the cell before its first
step (the ledger's identity, counts and the ε of its noise, recomputed).

Exactly ``steps`` updates run, each with ``directions`` releases; the trainer counts what really
ran (steps, releases, examples sampled, the noise it added) and checks that count against the
ledger again at the end (:func:`ledger.check_ledger_after`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable
import numpy as np
import torch
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.methods import ZO, base_method
from dpzo.masks.prune import Mask
from dpzo.zo.checkpoint import LoopState, TrainingCheckpoint
from dpzo.models.evaluate import TestLossCurve
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.progress import Progress
from dpzo.zo.flat import FlatParameters, direction_seed
from dpzo.zo.step import apply_update, spsa_differences
from dpzo.zo.precision import check_zo_scale


log = logging.getLogger(__name__)


def _check_finite_weights(flat: FlatParameters, step: int) -> None:
    if not bool(torch.isfinite(flat.master).all()):
        raise FloatingPointError(
            f"non-finite weights after step {step}; lower the learning rate (no metrics are written for this run)"
        )


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
    master_dtype: torch.dtype = torch.float32,
    masks: Callable[[int], Mask] | None = None,
    record_releases: bool = False,
    checkpoint: TrainingCheckpoint | None = None,
    curve: TestLossCurve | None = None,
    on_start: Callable[[int | None], None] | None = None,
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
    """
    method = base_method(method)
    spec = ZO.get(method)
    if spec is None:
        raise ValueError(f"train_zo runs the zeroth-order methods {tuple(ZO)}, not {method!r}")
    if spec.masked != (masks is not None):
        raise ValueError(f"{method}: masks are {'required' if spec.masked else 'not used'}")
    private = spec.private
    if hp.batch_size > n:
        raise ValueError(f"batch_size {hp.batch_size} is larger than the training set ({n} examples)")
    if private and (secret is None or noise is None):
        raise ValueError("a private method needs the secret RNG and the ledger's noise")
    if private and math.isinf(hp.clip):
        raise ValueError(f"{method} needs a finite clip")
    q = hp.batch_size / n
    public_rng = np.random.default_rng([int(run_seed), 1])  # mezo's batches: no privacy claim
    schedule = hp.schedule()
    starts = set(schedule.stage_starts())
    flat = FlatParameters(model, master_dtype=master_dtype, direction_cache_size=hp.directions)
    check_zo_scale(flat, min(schedule.beta_at(s) for s in range(hp.stages)))
    device = flat.device
    anchor = None

    history: dict[str, list] = {"step": [], "stage": [], "lr": [], "beta": [], "loss": [], "examples": [], "clipped_fraction": [], "grad": [], "mask_size": []}
    # Diagnostics stay on the device and are fetched once per log line: reading them every
    # step would make the host wait for the GPU in the middle of each step.
    losses_since_log: list[torch.Tensor] = []
    examples_since_log = 0
    clipped_since_log = torch.zeros((), dtype=torch.float64, device=device)
    first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)
    first_bad_update = torch.full((), -1, dtype=torch.long, device=device)
    largest_move = torch.finfo(flat.master.dtype).max
    # counted as they happen (host side, no sync, across resumes), for the check against the ledger
    first_step, releases, examples_sampled, prior_seconds, resumed_from = 0, 0, 0, 0.0, []
    released: list = []
    resumed = checkpoint.resume(flat, public_rng=public_rng, secret=secret) if checkpoint is not None else None
    if resumed is not None:
        first_step, releases, prior_seconds = resumed.step, resumed.releases, resumed.train_seconds
        anchor, history, resumed_from = resumed.anchor, resumed.history, resumed.resumed_from + [resumed.step]
        examples_sampled = resumed.examples_sampled
        losses, examples_since_log, clipped = resumed.since_log
        losses_since_log = [torch.tensor(x, dtype=torch.float64, device=device) for x in losses]
        clipped_since_log += clipped
    if on_start is not None:
        on_start(None if resumed is None else resumed.step)
    steps_run = first_step

    def raise_on_flags() -> None:
        """Stop, naming the first step, if a loss difference or an update was not finite."""
        bad_loss, bad_update = (int(x) for x in torch.stack([first_nonfinite, first_bad_update]).tolist())
        if bad_update >= 0 and (bad_loss < 0 or bad_update < bad_loss):
            raise FloatingPointError(
                f"non-finite update at step {bad_update} (lr = {schedule.lr_at(schedule.stage_of(bad_update))}); "
                "lower the learning rate (no metrics are written for this run)"
            )
        if bad_loss >= 0:
            raise FloatingPointError(
                f"non-finite loss difference at step {bad_loss} (beta={schedule.beta_at(schedule.stage_of(bad_loss))}); "
                "lower the learning rate or raise beta"
            )

    def loop_state(done: int) -> LoopState:
        """The loop's state after ``done`` steps, on the host (only built when a snapshot is due)."""
        raise_on_flags()  # never snapshot a run that has gone non-finite
        since_log = ([float(x) for x in losses_since_log], examples_since_log, float(clipped_since_log))
        return LoopState(done, releases, anchor, history, since_log, prior_seconds + time.perf_counter() - started,
                         resumed_from, examples_sampled)
    started = time.perf_counter()
    progress = Progress(hp.steps, done=first_step, prior_seconds=prior_seconds)
    for step in range(first_step, hp.steps):
        stage = schedule.stage_of(step)
        lr, beta = schedule.lr_at(stage), schedule.beta_at(stage)
        if step in starts:
            flat.restore()  # the weights are read below (dynamic masks, the anchor)
            if masks is not None:
                mask = masks(stage)
                scales = mask.scales
                rank_update = hp.mask is not None and hp.mask.rank_update
                flat.set_mask(mask.indices, perturb_scales=scales, update_scales=scales if rank_update else None)
                history["mask_size"].append(len(mask))
            if hp.lam:
                anchor = flat.snapshot()  # theta_s: a real copy taken at the start of each stage
        seeds, grads = [], []
        for p in range(hp.directions):
            if private:
                index = secret.poisson_batch(n, q)
            else:
                index = public_rng.choice(n, size=hp.batch_size, replace=False)
            seed = direction_seed(run_seed, step, p)
            if len(index) == 0:
                d = torch.zeros(0, dtype=torch.float64, device=device)
            else:
                d, loss_plus, loss_minus = spsa_differences(lambda: per_example_loss(index), flat, seed, beta, restore=False)
                first_nonfinite = torch.where((first_nonfinite < 0) & ~torch.isfinite(d).all(), step, first_nonfinite)
                losses_since_log.append(0.5 * (loss_plus + loss_minus).mean())
            g, clipped = spec.release(d, clip=hp.clip, beta=beta, noise=noise, secret=secret)
            if private:
                clipped_since_log += clipped
                releases += 1
                if record_releases:
                    released.append(g)
            seeds.append(seed)
            grads.append(g)
            examples_since_log += len(index)
            examples_sampled += len(index)
        # Each move lr * g must be a finite number of the weights' precision; flagged on the
        # device and reported at the next log line (no metrics are written for such a run).
        moves = lr * torch.stack([torch.as_tensor(g, dtype=torch.float64, device=device) for g in grads])
        fits = (torch.isfinite(moves) & (moves.abs() <= largest_move)).all()
        first_bad_update = torch.where((first_bad_update < 0) & ~fits, step, first_bad_update)
        apply_update(flat, seeds, grads, lr=lr, lam=hp.lam, anchor=anchor, restore=False)
        steps_run += 1
        if (step + 1) % hp.log_every == 0 or step + 1 == hp.steps:
            loss = torch.stack(losses_since_log).double().mean() if losses_since_log else torch.tensor(math.nan, dtype=torch.float64, device=device)
            raise_on_flags()
            _check_finite_weights(flat, step)
            mean_grad = torch.stack([torch.as_tensor(g, dtype=torch.float64, device=device) for g in grads]).mean()
            fetched = torch.stack([loss, clipped_since_log, mean_grad]).tolist()
            history["step"].append(step + 1)
            history["stage"].append(stage)
            history["lr"].append(lr)
            history["beta"].append(beta)
            history["loss"].append(fetched[0])
            log.info("%s", progress.line(step + 1, stage=stage, loss=fetched[0]))
            history["examples"].append(examples_since_log)
            history["clipped_fraction"].append(fetched[1] / max(examples_since_log, 1))
            history["grad"].append(fetched[2])  # the mean released scalar of this step
            losses_since_log = []
            examples_since_log = 0
            clipped_since_log.zero_()
        if curve is not None:
            curve.after_step(step + 1, history, prepare=flat.restore)
        if checkpoint is not None:
            checkpoint.step_done(step + 1, lambda: loop_state(step + 1), flat, public_rng=public_rng, secret=secret)
    flat.restore()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock must see the GPU's work, not only its launch
    elapsed = prior_seconds + time.perf_counter() - started
    history["steps_run"] = steps_run
    history["releases"] = releases  # counted, across resumes: checked against the ledger
    history["examples_sampled"] = examples_sampled
    history["resumed_from"] = resumed_from
    history["n"] = n
    history["sampling_rate"] = q
    history["noise_scale_on_sum"] = noise.scale if private else 0.0
    history["noise_divisor"] = noise.divisor if private else float(hp.batch_size)
    if record_releases:
        history["released"] = [float(g) for g in released]
    history["train_seconds"] = elapsed
    history["ms_per_step"] = 1000.0 * elapsed / max(hp.steps, 1)
    history["stage_starts"] = schedule.stage_starts()
    return history
