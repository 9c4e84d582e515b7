"""Differential-privacy accounting and the secret randomness for DP zeroth-order training.

Mechanism being accounted
-------------------------
Every training step, for each of its ``P`` perturbation directions, releases one scalar::

    (sum_{i in B} clip(v_i, -C, C) + N(0, (sigma * C)^2)) / (q * n)

where ``B`` is a fresh Poisson-subsampled batch (each example included independently with
probability ``q``).  Under add/remove-one-example neighbouring the sum has sensitivity
``C``, so each release is a Poisson-subsampled Gaussian mechanism with noise multiplier
``sigma`` and rate ``q``.  Because every direction draws its own batch, ``T`` steps with
``P`` directions are ``T * P`` such releases, and the accountants below compose exactly
that: ``compositions = T * P`` copies of ``PoissonSampled(q, Gaussian(sigma))``.
Dividing by the *expected* batch size ``q * n`` (a public constant) is post-processing and
costs nothing.

Design notes
------------
* ``dp_accounting`` and ``prv_accountant`` take ~1 s to import, so they are imported
  lazily inside the functions that need them; importing this module stays cheap and never
  pulls in torch.
* All randomness that the privacy proof relies on (batch sampling and noise) comes from
  :class:`SecretRandom`, which is seeded from the OS, never from a config seed, and never
  shares state with numpy's or torch's global generators (those are seeded from configs
  for reproducibility, so an attacker who reads the config could replay them).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator
from typing import Any

import numpy as np

#: Accountants understood by :func:`epsilon` and :func:`calibrate_sigma`.
ACCOUNTANTS: tuple[str, ...] = ("pld", "prv", "rdp")


#: Default PLD discretization.  The PLD accountant is a pessimistic (valid) upper bound for
#: any discretization, but a coarse grid costs real noise on long runs (1e-3 instead of 1e-4
#: needs 3.4% more sigma at 1e5 compositions), while 1e-4 still calibrates in about 2 s.
DEFAULT_PLD_DISCRETIZATION = 1e-4


# PRV accountant error budget (fixed so that results are comparable across runs).
_PRV_EPS_ERROR = 0.1


_PRV_DELTA_ERROR_FRACTION = 1e-3  # delta_error = delta / 1000


def check_q(q: float) -> float:
    """``q`` as a float; raises ValueError unless 0 < q <= 1."""
    q = float(q)
    if not (0.0 < q <= 1.0):  # also rejects NaN
        raise ValueError(f"q (Poisson sampling rate) must satisfy 0 < q <= 1; got {q!r}")
    return q


def check_compositions(compositions: int) -> int:
    """``compositions`` as an int; raises ValueError unless it is an integer >= 1."""
    try:
        c = operator.index(compositions)
    except TypeError:
        raise ValueError(f"compositions must be an integer >= 1; got {compositions!r}") from None
    if c < 1:
        raise ValueError(f"compositions must be an integer >= 1; got {c}")
    return c


def check_delta(delta: float) -> float:
    """``delta`` as a float; raises ValueError unless 0 < δ < 1."""
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must satisfy 0 < delta < 1; got {delta!r}")
    return delta


def check_accountant(accountant: str) -> str:
    """``accountant`` unchanged; raises ValueError unless it is one of :data:`ACCOUNTANTS`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}; got {accountant!r}")
    return accountant


def check_sigma(sigma: float) -> float:
    """``sigma`` as a float; raises ValueError when it is negative or NaN (inf is allowed)."""
    sigma = float(sigma)
    if math.isnan(sigma) or sigma < 0:
        raise ValueError(f"sigma (noise multiplier) must be >= 0 (inf allowed); got {sigma!r}")
    return sigma


def check_pld_discretization(d: float) -> float:
    """``d`` as a float; raises ValueError unless 0 < d < 1."""
    d = float(d)
    if not (0.0 < d < 1.0):
        raise ValueError(f"pld_discretization must satisfy 0 < pld_discretization < 1; got {d!r}")
    return d


def dp_event(sigma: float, q: float, compositions: int) -> Any:
    """The ``dp_accounting`` event of a run: ``compositions`` copies of PoissonSampled(q, Gaussian(sigma))."""
    from dp_accounting import dp_event

    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), compositions
    )


def pld_accountant(pld_discretization: float) -> Any:
    """A fresh ``dp_accounting`` PLD accountant with value discretization ``pld_discretization``."""
    from dp_accounting.pld import pld_privacy_accountant

    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=pld_discretization)


@contextlib.contextmanager
def _quiet_numpy() -> Iterator[None]:
    # prv_accountant evaluates exp() on a wide grid and overflows harmlessly to inf
    # (it then takes log of it); silence the resulting RuntimeWarnings.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        yield


def _epsilon_pld(sigma: float, q: float, compositions: int, delta: float, disc: float) -> float:
    accountant = pld_accountant(disc)
    accountant.compose(dp_event(sigma, q, compositions))
    return float(accountant.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # For small sigma, dp_accounting's RDP series for fractional orders close to 1 do not
    # converge and it logs a warning per order while *excluding* that order.  Excluding
    # orders can only make the bound larger (more conservative), so the messages are noise
    # (they would otherwise clutter the CLI's stderr during calibration).
    import logging

    log = logging.getLogger("absl")
    old_level = log.level
    log.setLevel(max(old_level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(old_level)


def _epsilon_rdp(sigma: float, q: float, compositions: int, delta: float) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    with _quiet_absl():
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(dp_event(sigma, q, compositions))
        return float(accountant.get_epsilon(delta))


def _epsilon_prv(sigma: float, q: float, compositions: int, delta: float) -> float:
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    with _quiet_numpy():
        accountant = PRVAccountant(
            # prvs must be a *list* (one entry per mechanism type), same for compositions.
            prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)],
            max_self_compositions=[compositions],
            eps_error=_PRV_EPS_ERROR,
            delta_error=delta * _PRV_DELTA_ERROR_FRACTION,
        )
        _low, _estimate, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=[compositions])
    # The upper end of PRV's confidence interval is the conservative (reportable) value.
    return float(upper)


def epsilon(
    sigma: float,
    q: float,
    compositions: int,
    delta: float,
    accountant: str = "pld",
    *,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` of ``compositions`` Poisson-subsampled Gaussian releases.

    Args:
        sigma: noise multiplier (noise std on the clipped sum divided by the clip C).
            ``0`` means no noise (returns ``inf``); ``inf`` means no release (returns ``0.0``).
        q: Poisson sampling rate, ``0 < q <= 1``.
        compositions: number of releases, ``steps * directions`` (``>= 1``).
        delta: target delta, ``0 < delta < 1``.
        accountant: ``"pld"`` (dp_accounting privacy-loss distributions; tight and a
            pessimistic upper bound), ``"prv"`` (Microsoft prv_accountant; we return the upper
            end of its error interval) or ``"rdp"`` (dp_accounting Renyi DP; loosest).
        pld_discretization: value discretization interval of the PLD accountant.

    Returns:
        An upper bound on epsilon (add/remove-one-example neighbouring).
    """
    accountant = check_accountant(accountant)
    q = check_q(q)
    compositions = check_compositions(compositions)
    delta = check_delta(delta)
    sigma = check_sigma(sigma)
    pld_discretization = check_pld_discretization(pld_discretization)
    return epsilon_unchecked(sigma, q, compositions, delta, accountant, pld_discretization)


def epsilon_unchecked(sigma: float, q: float, compositions: int, delta: float, accountant: str, disc: float) -> float:
    """:func:`epsilon` after validation (calibration calls this many times)."""
    if sigma == 0.0:
        return math.inf
    if math.isinf(sigma):
        return 0.0
    if accountant == "pld":
        return _epsilon_pld(sigma, q, compositions, delta, disc)
    if accountant == "prv":
        return _epsilon_prv(sigma, q, compositions, delta)
    return _epsilon_rdp(sigma, q, compositions, delta)


def _log_sf(z: float) -> float:
    """log P(N(0, 1) > z), accurate far into the tail."""
    from scipy.special import log_ndtr

    return float(log_ndtr(-z))


def single_release_delta(sigma: float, q: float, eps: float) -> float:
    """δ(ε) of ONE Poisson-subsampled Gaussian release (sensitivity 1, noise std ``sigma``, rate
    ``q``) under add/remove neighbouring, in closed form: the larger of the hockey-stick
    divergences of the dominating pair P = (1-q) N(0, σ²) + q N(1, σ²), Q = N(0, σ²) and of
    (Q, P).  The likelihood ratio is monotone in the output, so each divergence is two normal
    tail probabilities at the threshold where the ratio crosses e^ε."""
    # remove (P against Q): the ratio (1-q) + q exp((2x-1)/(2σ²)) exceeds e^ε above x_r
    log_excess = eps + math.log1p(-(1.0 - q) * math.exp(-eps)) if eps > 0 or q < 1 else math.log(q)
    x_r = sigma**2 * (log_excess - math.log(q)) + 0.5
    remove = q * math.exp(_log_sf((x_r - 1.0) / sigma)) - math.exp(log_excess + _log_sf(x_r / sigma))
    # add (Q against P): the ratio falls below e^-ε below x_a, which exists only while e^-ε > 1 - q
    add = 0.0
    if math.exp(-eps) > 1.0 - q:
        x_a = sigma**2 * (math.log(math.exp(-eps) - (1.0 - q)) - math.log(q)) + 0.5
        below = math.exp(_log_sf(-x_a / sigma))  # P(N(0, σ²) < x_a)
        below_shifted = math.exp(_log_sf((1.0 - x_a) / sigma))  # P(N(1, σ²) < x_a)
        add = (1.0 - math.exp(eps) * (1.0 - q)) * below - math.exp(eps) * q * below_shifted
    return max(remove, add, 0.0)


def single_release_epsilon(sigma: float, q: float, delta: float) -> float:
    """A lower bound on the ε at δ of any number of Poisson-subsampled Gaussian releases with
    multiplier ``sigma`` and rate ``q``, under every accountant: the ε of the first release
    alone (more releases can only cost more), from :func:`single_release_delta`.

    Costs a few dozen normal tail evaluations, whatever ``sigma``: it refuses a noise that is
    absurd for its claim (σ = 0.01) in microseconds, where a PLD accountant would build a grid of
    hundreds of millions of points.  The value returned is a point where δ(ε) is still above
    ``delta`` by a safety margin, so it never exceeds the true ε."""
    q, delta, sigma = check_q(q), check_delta(delta), check_sigma(sigma)
    if sigma == 0.0:
        return math.inf
    if math.isinf(sigma):
        return 0.0

    def above(eps: float) -> bool:  # δ(eps) certainly above delta: eps is below the true ε
        return single_release_delta(sigma, q, eps) > delta * (1.0 + 1e-6)

    if not above(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while above(hi):
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if above(mid) else (lo, mid)
    return lo


def exceeds_at_first_release(sigma: float, q: float, delta: float, target: float) -> float | None:
    """The one-release lower bound (:func:`single_release_epsilon`) when it already exceeds
    ``target`` (beyond float noise), else None: the cheap refusal every check of a σ against a
    target asks before any accountant builds its grid."""
    bound = single_release_epsilon(sigma, q, delta)
    return bound if bound > float(target) * (1.0 + 1e-6) else None


def certified_epsilon(
    sigma: float,
    q: float,
    compositions: int,
    delta: float,
    accountant: str,
    target: float,
    *,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> tuple[float, bool]:
    """The ε of ``compositions`` releases, for checking it against ``target``: a cheap bound first,
    the accountant only when the bound cannot decide.  Returns ``(epsilon, exact)``: when the
    one-release lower bound (:func:`single_release_epsilon`) already exceeds ``target``, that bound
    and False (the accountant would say more); otherwise the accountant's value and True.
    ``accountant`` is one of :data:`ACCOUNTANTS` or ``"opacus-rdp"`` (DPZero's published accounting)."""
    bound = exceeds_at_first_release(sigma, q, delta, target)
    if bound is not None:
        return bound, False
    if accountant == "opacus-rdp":
        return opacus_epsilon(sigma, delta, q, compositions), True
    return epsilon(sigma, q, compositions, delta, accountant, pld_discretization=pld_discretization), True


def library_versions() -> dict[str, str]:
    """Versions of the accounting libraries (recorded next to every privacy claim)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("dp-accounting", "prv-accountant", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def opacus_epsilon(sigma: float, delta: float, q: float, steps: int) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian releases with multiplier ``sigma``, by
    opacus' RDP accountant (the accountant DPZero's published numbers use)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(sigma), float(q), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


def laplace_epsilon(eps0: float, q: float, compositions: int) -> float:
    """Total pure-DP epsilon of ``compositions`` Poisson-subsampled eps0-DP releases."""
    return compositions * math.log1p(q * math.expm1(eps0))


def distribution_version(dist: str) -> str:
    """The installed version of the distribution ``dist``, or ``"not installed"``."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"
