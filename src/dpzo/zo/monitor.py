"""What the zeroth-order trainer watches while it runs, kept apart from the algorithm.

* Non-finite values: the first step whose loss differences were not finite and the first whose
  move lr * g was not a finite number of the weights' precision.  Both are flags on the device,
  read together with the log line's values: reading them every step would make the host wait
  for the GPU in the middle of each step.
* The log: the losses, examples and clipped examples since the last log line become a row of
  the history and a progress line (``dpzo.progress``).
* The counts the ledger is checked against at the end (``ledger.check_ledger_after``): steps
  run, releases, examples sampled, and the steps earlier runs of the cell stopped after.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from dpzo.methods.hyperparameters import StageSchedule
from dpzo.progress import Progress
from dpzo.zo.step import StepResult
from dpzo.zo.store import ParameterStore

#: the rows of the history, one entry per log line (``mask_size``: one per stage)
HISTORY_KEYS = ("step", "stage", "lr", "beta", "loss", "examples", "clipped_fraction", "grad", "mask_size")


class TrainingMonitor:
    """The bookkeeping of one zeroth-order run of ``steps`` steps (see the module docstring).

    Call :meth:`start` before the first step, :meth:`after_step` after each, :meth:`finish` at
    the end.  A private run counts its releases and clipped examples; with ``record_releases``
    it also keeps every released scalar.  ``history`` is the run's history, to which the
    test-loss curve adds its points.
    """

    def __init__(
        self,
        schedule: StageSchedule,
        store: ParameterStore,
        *,
        steps: int,
        log_every: int,
        private: bool,
        record_releases: bool = False,
        log: logging.Logger | None = None,
    ):
        self.schedule, self.store, self.steps, self.log_every = schedule, store, int(steps), int(log_every)
        self.private, self.record_releases = private, record_releases
        self.log = log or logging.getLogger(__name__)
        self.device = device = store.device
        self.history: dict[str, list] = {key: [] for key in HISTORY_KEYS}
        self.steps_run = self.releases = self.examples_sampled = 0
        self.resumed_from: list[int] = []
        self.released: list = []
        self._prior_seconds = 0.0
        self._losses: list[torch.Tensor] = []
        self._examples = 0
        self._clipped = torch.zeros((), dtype=torch.float64, device=device)
        # 1 + the first flagged step, 0: none (a value read under fake tensors answers 0, so a
        # projected run, ``dpzo plan``, reads "no flag" and runs on as a healthy one would)
        self._first_nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self._first_bad_update = torch.zeros((), dtype=torch.long, device=device)
        self._largest_move = torch.finfo(store.master_dtype).max

    # -- a run --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the clock (the training time excludes setup; a resumed run adds its prior time)."""
        self._started = time.perf_counter()
        self._progress = Progress(self.steps, done=self.steps_run, prior_seconds=self._prior_seconds)

    def stage_started(self, mask_size: int) -> None:
        """A stage began training a mask of ``mask_size`` coordinates."""
        self.history["mask_size"].append(mask_size)

    def after_step(self, step: int, stage: int, result: StepResult) -> None:
        """Count step ``step`` (0-based) of ``stage``, flag what was not finite, log when due."""
        for d in result.differences:
            bad = ~torch.isfinite(d).all()
            self._first_nonfinite = torch.where((self._first_nonfinite == 0) & bad, step + 1, self._first_nonfinite)
        self._losses.extend(result.losses)
        if self.private:
            for clipped in result.clipped:
                self._clipped += clipped
            self.releases += len(result.examples)  # one release per batch (DP-AggZO: K scalars at once)
            if self.record_releases:
                self.released.extend(result.grads)
        self._examples += sum(result.examples)
        self.examples_sampled += sum(result.examples)
        # Each move lr * g must be a finite number of the weights' precision; such a run writes
        # no metrics, so one flag is enough.
        lr = self.schedule.lr_at(stage)
        moves = lr * torch.stack([torch.as_tensor(g, dtype=torch.float64, device=self.device) for g in result.grads])
        fits = (torch.isfinite(moves) & (moves.abs() <= self._largest_move)).all()
        self._first_bad_update = torch.where((self._first_bad_update == 0) & ~fits, step + 1, self._first_bad_update)
        self.steps_run += 1
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
            self._log_line(step, stage, result)

    def _log_line(self, step: int, stage: int, result: StepResult) -> None:
        """One history row and one progress line: the window's values come to the host here."""
        if self._losses:
            loss = torch.stack(self._losses).double().mean()
        else:
            loss = torch.tensor(math.nan, dtype=torch.float64, device=self.device)
        self.raise_on_flags()
        self._check_finite_weights(step)
        mean_grad = torch.stack(
            [torch.as_tensor(g, dtype=torch.float64, device=self.device) for g in result.grads]
        ).mean()
        loss, clipped, mean_grad = torch.stack([loss, self._clipped, mean_grad]).tolist()
        row = self.history
        row["step"].append(step + 1)
        row["stage"].append(stage)
        row["lr"].append(self.schedule.lr_at(stage))
        row["beta"].append(self.schedule.beta_at(stage))
        row["loss"].append(loss)
        self.log.info("%s", self._progress.line(step + 1, stage=stage, loss=loss))
        row["examples"].append(self._examples)
        row["clipped_fraction"].append(clipped / max(self._examples, 1))
        row["grad"].append(mean_grad)  # the mean released scalar of this step
        self._losses = []
        self._examples = 0
        self._clipped.zero_()

    def raise_on_flags(self) -> None:
        """Stop, naming the first step, if a loss difference or an update was not finite."""
        flags = torch.stack([self._first_nonfinite, self._first_bad_update]).tolist()
        bad_loss, bad_update = (int(x) - 1 for x in flags)  # -1: none
        schedule = self.schedule
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

    def _check_finite_weights(self, step: int) -> None:
        if not self.store.weights_finite():
            raise FloatingPointError(
                f"non-finite weights after step {step}; lower the learning rate (no metrics are written for this run)"
            )

    def elapsed(self) -> float:
        """Training seconds of the cell so far (this process's and those before a resume)."""
        return self._prior_seconds + time.perf_counter() - self._started

    def finish(self, **constants) -> dict:
        """The history, completed with the counts, the run's public ``constants`` (what the
        ledger check compares), the released scalars if recorded, and the timing."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock must see the GPU's work, not only its launch
        elapsed = self.elapsed()
        history = self.history
        history["steps_run"] = self.steps_run
        history["releases"] = self.releases  # counted, across resumes: checked against the ledger
        history["examples_sampled"] = self.examples_sampled
        history["resumed_from"] = self.resumed_from
        history.update(constants)
        if self.record_releases:
            history["released"] = [float(g) for g in self.released]
        history["train_seconds"] = elapsed
        history["ms_per_step"] = 1000.0 * elapsed / max(self.steps, 1)
        history["stage_starts"] = self.schedule.stage_starts()
        return history

    # -- snapshots ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The counts, the history and the open log window, on the host (one sync).

        Refuses (``FloatingPointError``) a run that has gone non-finite: it is never snapshot.
        The released scalars are not part of it (a resumed run records only its own).
        """
        self.raise_on_flags()
        return {
            "step": self.steps_run,
            "releases": self.releases,
            "history": self.history,
            "since_log": ([float(x) for x in self._losses], self._examples, float(self._clipped)),
            "train_seconds": self.elapsed(),
            "resumed_from": self.resumed_from,
            "examples_sampled": self.examples_sampled,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the run that :meth:`state_dict` describes: its counts, history and log
        window carry on, and its step is added to ``resumed_from``."""
        self.steps_run, self.releases = int(state["step"]), int(state["releases"])
        self.examples_sampled = int(state["examples_sampled"])
        self.history = state["history"]
        self.resumed_from = list(state["resumed_from"]) + [self.steps_run]
        self._prior_seconds = float(state["train_seconds"])
        losses, self._examples, clipped = state["since_log"]
        self._losses = [torch.tensor(x, dtype=torch.float64, device=self.device) for x in losses]
        self._clipped.zero_()
        self._clipped += clipped
