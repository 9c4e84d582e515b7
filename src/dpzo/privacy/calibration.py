"""Calibration: the smallest noise multiplier whose achieved ε meets a target (kept apart from the accountants it queries)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dpzo.privacy.accountants import (
    DEFAULT_PLD_DISCRETIZATION,
    check_accountant,
    check_compositions,
    check_delta,
    check_pld_discretization,
    check_q,
    dp_event,
    epsilon_unchecked,
    exceeds_at_first_release,
    pld_accountant,
)

#: Calibration refuses to go beyond this noise multiplier (the target is then unreachable
#: for any useful training run).
MAX_SIGMA = 1e4


def _unreachable(target: float, delta: float, q: float, compositions: int, accountant: str) -> ValueError:
    return ValueError(
        f"epsilon={target!r} at delta={delta!r} is unreachable with q={q!r} and "
        f"compositions={compositions} ({accountant} accountant): it would need a noise "
        f"multiplier above {MAX_SIGMA:g}. Increase epsilon or delta, or reduce the number of "
        "steps/directions or the sampling rate (batch_size/n)."
    )


def _find_bracket(
    eps_of: Callable[[float], float],
    target: float,
    start: float,
    factor: float,
    on_unreachable: Callable[[], ValueError],
) -> tuple[float, float]:
    """Return ``(lo, hi)`` with ``eps_of(lo) > target >= eps_of(hi)``, searching geometrically.

    Starts at ``start`` and multiplies/divides by ``factor``.  Epsilon is decreasing in
    sigma, so the search moves up while infeasible and down while feasible.
    """
    s = start
    if eps_of(s) <= target:
        hi = s
        while True:
            lo = hi / factor
            if eps_of(lo) > target:
                return lo, hi
            hi = lo
    lo = s
    while True:
        if lo >= MAX_SIGMA:
            raise on_unreachable()
        hi = min(lo * factor, MAX_SIGMA)
        if eps_of(hi) <= target:
            return lo, hi
        lo = hi


def _solve_log_sigma(eps_of: Callable[[float], float], target: float, lo: float, hi: float, rtol: float) -> float:
    """Smallest feasible sigma in ``(lo, hi]`` to relative tolerance ``rtol``.

    Brent's method on ``log(sigma)`` (epsilon is close to a power law in sigma, so few
    evaluations are needed), followed by a step to the feasible side of the root so that
    the result is *verified* to satisfy ``eps_of(sigma) <= target``.
    """
    from scipy.optimize import brentq

    def gap(log_s: float) -> float:
        # Clip inf so Brent's interpolation stays finite; only the sign matters at the ends.
        return min(eps_of(math.exp(log_s)), 1e12) - target

    xtol = rtol / 2
    root = brentq(gap, math.log(lo), math.log(hi), xtol=xtol, rtol=4 * np.finfo(float).eps)
    # brentq guarantees a sign change within xtol of ``root``; the feasible side is above.
    candidate = root + xtol
    for _ in range(50):  # robust against tiny numerical non-monotonicity
        if candidate >= math.log(hi) or gap(candidate) <= 0:
            break
        candidate += xtol
    return float(min(math.exp(candidate), hi))


def calibrate_sigma(
    epsilon: float,
    delta: float,
    q: float,
    compositions: int,
    accountant: str = "pld",
    *,
    rtol: float = 1e-4,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Smallest noise multiplier ``sigma`` with ``epsilon(sigma, ...) <= epsilon`` (to ``rtol``).

    The returned sigma is always feasible for the chosen accountant, and at most about
    ``(1 + rtol)`` times the exact smallest feasible value.

    Args:
        epsilon: target epsilon (``>= 0``); ``inf`` means non-private and returns ``0.0``.
        delta: target delta, ``0 < delta < 1``.
        q: Poisson sampling rate, ``0 < q <= 1``.
        compositions: ``steps * directions``.
        accountant: ``"pld"``, ``"prv"`` or ``"rdp"`` (see :func:`epsilon`).
        rtol: relative tolerance on sigma.
        pld_discretization: PLD value discretization (only used by ``"pld"``).

    Raises:
        ValueError: on invalid input, or if the target needs ``sigma > MAX_SIGMA``.
    """
    target = float(epsilon)
    if math.isnan(target) or target < 0:
        raise ValueError(f"epsilon (target) must be >= 0 (inf allowed); got {epsilon!r}")
    accountant = check_accountant(accountant)
    q = check_q(q)
    compositions = check_compositions(compositions)
    delta = check_delta(delta)
    pld_discretization = check_pld_discretization(pld_discretization)
    rtol = float(rtol)
    if not (0.0 < rtol < 0.1):
        raise ValueError(f"rtol must satisfy 0 < rtol < 0.1; got {rtol!r}")
    if math.isinf(target):
        return 0.0

    def unreachable() -> ValueError:
        return _unreachable(target, delta, q, compositions, accountant)

    # Bracketing and Brent revisit points; cache them (PLD/PRV evaluations cost up to seconds).
    cache: dict[tuple[str, float], float] = {}

    def eps_with(name: str) -> Callable[[float], float]:
        def f(s: float) -> float:
            key = (name, s)
            if key not in cache:
                # where one release alone already exceeds the target, that bound decides (only the
                # side of the target matters to the search) without the accountant's cost at small σ
                bound = exceeds_at_first_release(s, q, delta, target) if name != "rdp" else None
                if bound is None:
                    bound = epsilon_unchecked(s, q, compositions, delta, name, pld_discretization)
                cache[key] = bound
            return cache[key]

        return f

    eps_rdp = eps_with("rdp")

    # RDP is cheap (~20-50 ms per evaluation even at small sigma), so it locates the
    # solution first; PRV/PLD evaluations get expensive at small sigma and are only done
    # near the answer.
    if accountant == "rdp":
        lo, hi = _find_bracket(eps_rdp, target, 1.0, 2.0, unreachable)
        return _solve_log_sigma(eps_rdp, target, lo, hi, rtol)
    try:
        lo, hi = _find_bracket(eps_rdp, target, 1.0, 2.0, unreachable)
        rdp_guess = _solve_log_sigma(eps_rdp, target, lo, hi, 1e-2)
    except ValueError:
        # RDP cannot reach the target below MAX_SIGMA; the tighter accountant might.
        rdp_guess = MAX_SIGMA

    # RDP usually over-estimates epsilon by 5-15% in sigma, so sigma_rdp is (almost always)
    # feasible for PLD/PRV as well and the answer lies a little below it.
    eps_acc = eps_with(accountant)
    lo, hi = _find_bracket(eps_acc, target, rdp_guess, 1.2, unreachable)

    if accountant == "prv":
        return _solve_log_sigma(eps_acc, target, lo, hi, rtol)

    # PLD: dp_accounting's own calibrator (Brent, then a check/bisection that guarantees a
    # feasible result within ``tol`` of the optimum).  ``tol`` is absolute in sigma.
    from dp_accounting import mechanism_calibration

    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: pld_accountant(pld_discretization),
        lambda s: dp_event(s, q, compositions),
        target,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
        tol=rtol * lo,
    )
    return float(sigma)


def memoized(
    cache_dir: str | Path | None,
    key: dict[str, Any],
    compute: Callable[[], dict[str, Any]],
    verify: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """``compute()``, kept as JSON in ``cache_dir`` under a hash of ``key`` (None: no cache).

    ``key`` must name everything the result depends on, library versions included.  A lock
    per key makes concurrent jobs wait for the one computing it; the stored key is compared
    in full on reading, and the file is written atomically.  A stored value is used only when
    ``verify(value)`` holds (a cache is a file anyone can edit); an unreadable, foreign or
    unverified entry is logged, recomputed and replaced, never fatal.
    """
    if cache_dir is None:
        return compute()
    import fcntl
    import hashlib
    import json
    import logging

    from dpzo.fileio import write_json_atomic

    text = json.dumps(key, sort_keys=True)
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(text.encode()).hexdigest()[:32]
    path = folder / f"{name}.json"
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                same_key = json.dumps(stored.get("key"), sort_keys=True) == text
                if same_key and (verify is None or verify(stored["value"])):
                    return stored["value"]
                why = "it was made for another key" if not same_key else "its value does not verify"
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                why = f"it is unreadable ({type(err).__name__}: {err})"
            logging.getLogger(__name__).warning("recomputing the cached calibration %s: %s", path, why)
        value = compute()
        write_json_atomic(path, {"key": key, "value": value})
    return value


def opacus_noise_multiplier(epsilon: float, delta: float, q: float, steps: int) -> float:
    """DPZero's sigma: ``opacus.accountants.utils.get_noise_multiplier`` (RDP, Poisson add/remove)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp")
    )


def laplace_step_epsilon(epsilon_total: float, q: float, compositions: int) -> tuple[float, float]:
    """Per-release epsilons of Poisson-subsampled Laplace releases composing to ``epsilon_total``.

    Basic composition of pure DP splits the budget evenly: eps_step = eps / T'.  Amplification
    by Poisson subsampling under add/remove (Li et al. 2012; Balle et al. 2018) turns an
    eps0-DP release into a log(1 + q (e^eps0 - 1))-DP one; inverting it gives the eps0 each
    unsampled release may spend.  Returns (eps_step, eps0).
    """
    eps_step = float(epsilon_total) / compositions
    eps0 = math.log1p(math.expm1(eps_step) / q)
    return eps_step, eps0
