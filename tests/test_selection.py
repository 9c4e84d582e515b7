"""Private selection (Papernot & Steinke 2022): the distribution of the number of runs against
scipy, the Rényi bound against the paper's closed forms for a Gaussian base, and against the
exact Rényi divergence of "the best of K Gaussian runs" computed by quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from dpzo.privacy.secret import SecretRandom
from dpzo.privacy.selection import (
    CandidateRun,
    Repetitions,
    calibrate_selection_sigma,
    candidate_epsilon,
    selection_epsilon,
    tnb_mean,
)

TNB = "truncated-negative-binomial"
SETTINGS = [
    Repetitions(TNB, 3.0, 1.0),
    Repetitions(TNB, 3.0, 0.0),
    Repetitions(TNB, 10.0, 0.5),
    Repetitions("poisson", 3.0),
]
K = np.arange(0, 4000)


def scipy_pmf(rep: Repetitions) -> np.ndarray:
    """The same distributions from scipy.stats (an independent parametrisation)."""
    if rep.name == "poisson":
        return stats.poisson(rep.mean).pmf(K)
    g = rep.gamma
    if rep.shape == 0:
        return np.where(K >= 1, stats.logser(1 - g).pmf(np.maximum(K, 1)), 0.0)
    nb = stats.nbinom(rep.shape, g)  # failures before the η-th success: K's law before truncation at 0
    return np.where(K >= 1, nb.pmf(K) / nb.sf(0), 0.0)


@pytest.mark.parametrize("rep", SETTINGS, ids=lambda r: f"{r.name}-{r.shape}-{r.mean}")
def test_distribution_matches_scipy_and_its_mean(rep):
    p = rep.pmf(K)
    np.testing.assert_allclose(p, scipy_pmf(rep), rtol=1e-9, atol=1e-300)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert (K * p).sum() == pytest.approx(rep.mean, rel=1e-9)
    if rep.name != "poisson":
        assert tnb_mean(rep.gamma, rep.shape) == pytest.approx(rep.mean, rel=1e-12)
        assert tnb_mean(rep.gamma, rep.shape) <= rep.mean  # the side the accounted bound covers


@pytest.mark.parametrize("rep", SETTINGS, ids=lambda r: f"{r.name}-{r.shape}-{r.mean}")
def test_sample_inverts_the_distribution_function(rep):
    cdf = np.cumsum(rep.pmf(K))
    for k in (0, 1, 2, 5, 13):
        if rep.pmf(np.array([k]))[0] == 0:
            continue
        below = cdf[k - 1] if k else 0.0
        assert rep.sample(np.nextafter(below, 1.0)) == k
        assert rep.sample(np.nextafter(cdf[k], 0.0)) == k
    secret = SecretRandom(insecure_test_seed=5)
    draws = np.array([rep.sample(secret.uniform()) for _ in range(20000)])
    assert draws.mean() == pytest.approx(rep.mean, rel=0.06)
    assert draws.min() >= (0 if rep.name == "poisson" else 1)


def test_invalid_distributions_are_refused_with_the_key():
    with pytest.raises(ValueError, match="tune.mean"):
        Repetitions(TNB, 1.0)
    with pytest.raises(ValueError, match="tune.shape"):
        Repetitions(TNB, 3.0, -0.5)
    with pytest.raises(ValueError, match="tune.distribution"):
        Repetitions("geometric", 3.0)
    with pytest.raises(ValueError, match="tune.score_noise"):
        CandidateRun(q=0.1, compositions=10, score_noise=0.0)


def rdp_curve(event, orders) -> np.ndarray:
    """The Rényi DP of ``event`` at ``orders``, from dp_accounting's RDP accountant (no public getter)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(list(orders))
    accountant.compose(event)
    return np.asarray(accountant._rdp, dtype=np.float64)


def _gaussian(s: float):
    from dp_accounting import dp_event

    return dp_event.GaussianDpEvent(s)


def _selection_rdp(rep: Repetitions, s: float, orders) -> np.ndarray:
    from dp_accounting import dp_event

    return rdp_curve(dp_event.RepeatAndSelectDpEvent(_gaussian(s), rep.mean, rep.dp_shape), orders)


ORDERS = [1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0]


@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("s", [2.0, 5.0])
def test_tnb_bound_matches_theorem_2_closed_form_for_a_gaussian_base(shape, s):
    """Theorem 2 with Q Gaussian (ε(λ) = λ / 2s²) minimised over a continuous λ̂ in closed form:
    λ̂* = s √(2 log 1/γ), so ε'(λ) = λ/2s² + (1+η)(√(2 log 1/γ)/s − 1/2s²) + log E[K]/(λ−1).
    dp_accounting minimises over its order grid, so it is above the closed form, and close."""
    rep = Repetitions(TNB, 4.0, shape)
    log_inv_gamma = math.log(1 / rep.gamma)
    assert s * math.sqrt(2 * log_inv_gamma) >= 1  # the continuous optimum is a valid order

    def closed(lam):
        return (
            lam / (2 * s * s)
            + (1 + shape) * (math.sqrt(2 * log_inv_gamma) / s - 1 / (2 * s * s))
            + math.log(rep.mean) / (lam - 1)
        )

    bound = _selection_rdp(rep, s, ORDERS)
    argmin = min(ORDERS, key=closed)
    for lam, value in zip(ORDERS, bound):
        if lam >= argmin:  # beyond the closed form's minimum dp_accounting's monotone pass changes nothing
            assert value >= closed(lam) - 1e-9
            assert value <= closed(lam) + 0.05 * (1 + shape) / s


@pytest.mark.parametrize("s", [1.0, 3.0])
def test_poisson_bound_matches_theorem_6_with_the_exact_gaussian_delta(s):
    """Theorem 6: ε'(λ) = ε(λ) + μ δ̂ + log μ / (λ−1) with δ̂ the δ of Q at ε̂ = log(1 + 1/(λ−1)).
    For a Gaussian the exact δ(ε̂) is the analytic formula; dp_accounting bounds δ̂ from the RDP
    curve (larger), so it is above the exact closed form."""
    mu = 3.0
    rep = Repetitions("poisson", mu)
    orders = [o for o in ORDERS if o >= 2]

    def exact_delta(eps):  # Balle & Wang 2018, sensitivity 1, standard deviation s
        return stats.norm.cdf(-eps * s + 1 / (2 * s)) - math.exp(eps) * stats.norm.cdf(-eps * s - 1 / (2 * s))

    bound = _selection_rdp(rep, s, orders)
    for lam, value in zip(orders, bound):
        closed = lam / (2 * s * s) + mu * exact_delta(math.log1p(1 / (lam - 1))) + math.log(mu) / (lam - 1)
        assert value >= closed - 1e-9


def _best_of_k_divergences(rep: Repetitions, s: float, orders) -> list[float]:
    """The exact D_λ between "the best of K runs" of N(1, s²) and of N(0, s²), both directions.

    The best of K iid runs with distribution function F has density f · G'(F), G the
    probability generating function of K; a Poisson K = 0 is an atom (no output) of equal mass."""
    ks = np.arange(1, 5000)
    pk = rep.pmf(ks)
    keep = int(np.flatnonzero(pk > 1e-25)[-1]) + 1  # the truncated series is exact to float64
    ks, pk = ks[:keep], pk[:keep]
    log_pk = np.log(np.maximum(pk, 1e-300))
    y = np.linspace(-12 * s, 12 * s + 1, 12001)
    dy = y[1] - y[0]

    def log_density(mean):
        log_f = stats.norm.logpdf(y, mean, s)
        log_cdf = stats.norm.logcdf(y, mean, s)
        # log G'(F) = logsumexp_k (log p_k + log k + (k - 1) log F)
        terms = log_pk[None, :] + np.log(ks)[None, :] + (ks - 1)[None, :] * log_cdf[:, None]
        return log_f + logsumexp(terms, axis=1)

    one, zero = log_density(1.0), log_density(0.0)
    atom = rep.pmf(np.array([0]))[0]
    out = []
    for lam in orders:
        both = []
        for p, q in ((one, zero), (zero, one)):
            integral = math.exp(logsumexp(lam * p + (1 - lam) * q) + math.log(dy)) + atom
            both.append(math.log(integral) / (lam - 1))
        out.append(max(both))
    return out


@pytest.mark.parametrize("rep", SETTINGS, ids=lambda r: f"{r.name}-{r.shape}-{r.mean}")
@pytest.mark.parametrize("s", [1.0, 4.0])
def test_bound_is_above_the_exact_divergence_of_the_best_of_k(rep, s):
    orders = [2.0, 4.0, 8.0, 16.0]
    bound = _selection_rdp(rep, s, orders)
    exact = _best_of_k_divergences(rep, s, orders)
    for lam, value, divergence in zip(orders, bound, exact):
        assert divergence <= value + 1e-9, (lam, divergence, value)
    # the oracle sees the selection: choosing the best of several runs leaks more than one run
    if rep.name != "poisson":
        assert exact[0] > 2.0 / (2 * s * s)


def test_selection_costs_more_than_one_candidate_and_calibration_meets_the_target():
    run = CandidateRun(q=1 / 16, compositions=120, score_noise=2.0)
    rep = Repetitions(TNB, 3.0, 1.0)
    sigma = calibrate_selection_sigma(4.0, 1e-5, run, rep)
    assert selection_epsilon(run, rep, sigma, 1e-5) <= 4.0
    assert selection_epsilon(run, rep, sigma * (1 - 1e-3), 1e-5) > 4.0
    assert candidate_epsilon(run, sigma, 1e-5) < selection_epsilon(run, rep, sigma, 1e-5)
    # more expected runs cost more
    assert selection_epsilon(run, Repetitions(TNB, 10.0, 1.0), sigma, 1e-5) > 4.0


def test_unreachable_target_names_the_fix():
    run = CandidateRun(q=1.0, compositions=10**6, score_noise=1.0)
    with pytest.raises(ValueError, match="tune.mean"):
        calibrate_selection_sigma(1e-3, 1e-5, run, Repetitions(TNB, 3.0))
