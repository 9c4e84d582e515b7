"""Private hyperparameter selection: a random number of candidate runs, only the best released.

Papernot & Steinke (ICLR 2022, "Hyperparameter Tuning with Renyi Differential Privacy").

Mechanism accounted
-------------------
``Q``, one candidate run, is itself a DP mechanism with a totally ordered score:

1. pick a point of the grid uniformly at random (secret generator; independent of the data);
2. train it on the cell's training rows minus the validation rows: ``T * P`` releases of the
   Poisson-subsampled Gaussian sum (:mod:`dpzo.privacy.accountants`), noise multiplier ``sigma``;
3. score it on the validation rows with a Gaussian count: ``#correct + N(0, score_sigma^2)``.
   Under add/remove-one-example the count has sensitivity 1.  It is the validation accuracy
   times the (public) validation size, so ordering by it orders by noisy accuracy.

``A`` draws ``K`` from :class:`Repetitions` (secret), runs ``Q`` ``K`` times and releases the run
with the highest noisy score: its model (hence its test accuracy), its hyperparameters and its
score.  ``K``, the other runs and their scores are not released: publishing ``K`` would turn the
random number of repetitions into a known one, and the bound below assumes it is hidden.

Accounting: ``Q``'s Rényi curve is the composition of (2) and (3) (not their maximum: the
validation rows are a fixed part of the data, so one neighbour may touch either).  ``A``'s
curve is Theorem 2 (truncated negative binomial) or Theorem 6 (Poisson) of the paper, as
``dp_accounting`` implements it (``RepeatAndSelectDpEvent``), converted to (ε, δ) by its RDP
accountant.  The calibration finds the smallest ``sigma`` whose selection meets the cell's ε,
with ``score_sigma = score_noise * sigma`` so that one number calibrates both.

No heavy imports: ``dp_accounting`` is imported inside the functions that use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpzo.privacy.accountants import _quiet_absl, check_compositions, check_delta, check_q, dp_event
from dpzo.privacy.calibration import MAX_SIGMA, _find_bracket, _solve_log_sigma

#: The distributions of the number of runs, by config name.
DISTRIBUTIONS = ("truncated-negative-binomial", "poisson")


@dataclass(frozen=True)
class Repetitions:
    """The distribution of the number of candidate runs ``K``.

    ``truncated-negative-binomial`` with ``shape`` η >= 0 (0: logarithmic, 1: geometric) has
    support ``K >= 1``: ``P[K = k] ∝ (1 - γ)^k Γ(k + η) / (Γ(η) k!)``, with γ set by the mean.
    ``poisson`` has support ``K >= 0``: with probability ``exp(-mean)`` nothing runs and the
    selection releases no model.
    """

    name: str
    mean: float
    shape: float = 1.0  # η of the truncated negative binomial; unused for poisson

    def __post_init__(self) -> None:
        if self.name not in DISTRIBUTIONS:
            raise ValueError(f"tune.distribution must be one of {', '.join(DISTRIBUTIONS)}; got {self.name!r}")
        if self.name == "poisson":
            if not (math.isfinite(self.mean) and self.mean > 0):
                raise ValueError(f"tune.mean (E[K]) of a Poisson number of runs must be > 0; got {self.mean!r}")
        else:
            if not (math.isfinite(self.mean) and self.mean > 1):
                raise ValueError(
                    f"tune.mean (E[K]) of a truncated negative binomial must be > 1 (K >= 1); got {self.mean!r}"
                )
            if not (math.isfinite(self.shape) and self.shape >= 0):
                raise ValueError(f"tune.shape (η) must be a finite number >= 0; got {self.shape!r}")

    @property
    def dp_shape(self) -> float:
        """The shape as ``dp_accounting`` takes it (infinity for Poisson)."""
        return math.inf if self.name == "poisson" else float(self.shape)

    @property
    def gamma(self) -> float:
        """γ of the truncated negative binomial with this mean (bisection on its mean; γ = 1/mean
        for the geometric)."""
        if self.name == "poisson":
            raise ValueError("a Poisson number of runs has no γ")
        if self.shape == 1:
            return 1.0 / self.mean
        lo, hi = 0.0, 1.0  # the mean falls from infinity (γ → 0) to 1 (γ → 1)
        for _ in range(200):
            mid = (lo + hi) / 2
            if tnb_mean(mid, self.shape) > self.mean:
                lo = mid
            else:
                hi = mid
        # The side whose mean is at most the configured one: the accounted bound (the configured
        # mean, dp_accounting's γ from below) then covers the distribution the runs are drawn from.
        return hi

    def pmf(self, k: np.ndarray) -> np.ndarray:
        """``P[K = k]`` for integer ``k`` (float64)."""
        from scipy.special import gammaln

        k = np.asarray(k, dtype=np.float64)
        if self.name == "poisson":
            log_p = k * math.log(self.mean) - self.mean - gammaln(k + 1)
            return np.where(k >= 0, np.exp(log_p), 0.0)
        g, eta = self.gamma, self.shape
        safe = np.maximum(k, 1.0)
        if eta == 0:  # logarithmic
            log_p = safe * math.log1p(-g) - np.log(safe) - math.log(math.log(1 / g))
        else:
            log_norm = math.log(g**-eta - 1)
            log_p = safe * math.log1p(-g) + gammaln(safe + eta) - gammaln(eta) - gammaln(safe + 1) - log_norm
        return np.where(k >= 1, np.exp(log_p), 0.0)

    def sample(self, uniform: float) -> int:
        """``K`` by inversion of the distribution function at ``uniform`` in [0, 1) (drawn by the
        caller from the secret generator)."""
        if not 0.0 <= uniform < 1.0:
            raise ValueError(f"uniform must be in [0, 1); got {uniform!r}")
        start, cumulative = (0 if self.name == "poisson" else 1), 0.0
        block = 256
        while True:
            ks = np.arange(start, start + block)
            cdf = cumulative + np.cumsum(self.pmf(ks))
            hit = np.flatnonzero(cdf > uniform)
            if hit.size:
                return int(ks[hit[0]])
            if cdf[-1] == cumulative:  # the tail is below float64's resolution
                return int(ks[-1])
            start, cumulative = start + block, float(cdf[-1])

    def as_dict(self) -> dict[str, Any]:
        """The distribution as recorded in a ledger."""
        out: dict[str, Any] = {"distribution": self.name, "mean": float(self.mean)}
        if self.name != "poisson":
            out.update(shape=float(self.shape), gamma=self.gamma)
        return out

    @classmethod
    def from_config(cls, tune: dict) -> Repetitions:
        """From a method's ``tune`` block (``distribution``, ``mean``, ``shape``)."""
        return cls(
            name=tune.get("distribution", "truncated-negative-binomial"),
            mean=float(tune["mean"]),
            shape=float(tune.get("shape", 1.0)),
        )


def tnb_mean(gamma: float, shape: float) -> float:
    """E[K] of the truncated negative binomial (the paper's closed form)."""
    if shape == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return shape * (1 - gamma) / (gamma * (1 - gamma**shape))


@dataclass(frozen=True)
class CandidateRun:
    """One candidate run ``Q`` as accounted: its training's releases and its score's noise."""

    q: float
    compositions: int  # T * P
    score_noise: float  # score_sigma / sigma

    def __post_init__(self) -> None:
        check_q(self.q)
        check_compositions(self.compositions)
        if not (math.isfinite(self.score_noise) and self.score_noise > 0):
            raise ValueError(f"tune.score_noise must be a finite number > 0; got {self.score_noise!r}")

    def dp_event(self, sigma: float) -> Any:
        """``Q`` as a ``dp_accounting`` event: the training's releases, then the noisy count."""
        from dp_accounting import dp_event as events

        return events.ComposedDpEvent(
            [dp_event(sigma, self.q, self.compositions), events.GaussianDpEvent(self.score_noise * sigma)]
        )


def selection_event(run: CandidateRun, repetitions: Repetitions, sigma: float) -> Any:
    """``A``: ``Q`` repeated a random number of times, the best run released."""
    from dp_accounting import dp_event as events

    return events.RepeatAndSelectDpEvent(run.dp_event(sigma), repetitions.mean, repetitions.dp_shape)


def _epsilon_of(event: Any, delta: float) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    with _quiet_absl():
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def selection_epsilon(run: CandidateRun, repetitions: Repetitions, sigma: float, delta: float) -> float:
    """ε at ``delta`` of the whole selection (all candidate runs and the release of the best)."""
    return _epsilon_of(selection_event(run, repetitions, sigma), check_delta(delta))


def candidate_epsilon(run: CandidateRun, sigma: float, delta: float) -> float:
    """ε at ``delta`` of one candidate run (training and score) by the same RDP accountant."""
    return _epsilon_of(run.dp_event(sigma), check_delta(delta))


def calibrate_selection_sigma(
    epsilon: float, delta: float, run: CandidateRun, repetitions: Repetitions, *, rtol: float = 1e-4
) -> float:
    """The smallest noise multiplier whose selection meets ``epsilon`` at ``delta`` (verified)."""
    target, delta = float(epsilon), check_delta(delta)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"a tuned private cell needs a finite epsilon > 0; got {epsilon!r}")
    cache: dict[float, float] = {}

    def eps_of(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = selection_epsilon(run, repetitions, sigma, delta)
        return cache[sigma]

    def unreachable() -> ValueError:
        return ValueError(
            f"epsilon={target!r} at delta={delta!r} is unreachable for the selection ({repetitions.as_dict()}, "
            f"q={run.q}, T*P={run.compositions}): it would need a noise multiplier above {MAX_SIGMA:g}. "
            "Lower tune.mean, raise epsilon, or train fewer steps"
        )

    lo, hi = _find_bracket(eps_of, target, 1.0, 2.0, unreachable)
    return _solve_log_sigma(eps_of, target, lo, hi, rtol)


def noisy_count(correct: int, score_sigma: float, draw_normal: Callable[[], float]) -> float:
    """The candidate's score: its number of correct validation predictions plus N(0, score_sigma^2)."""
    return float(correct) + float(score_sigma) * draw_normal()
