"""Privacy records: what a cell's ledger holds for each accounting convention (calibrated σ, achieved ε, the counts)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpzo.methods.base import ADD_REMOVE
from dpzo.privacy.accountants import (
    ACCOUNTANTS,
    DEFAULT_PLD_DISCRETIZATION,
    check_accountant,
    check_delta,
    check_pld_discretization,
    check_sigma,
    distribution_version,
    epsilon,
    epsilon_unchecked,
    exceeds_at_first_release,
    laplace_epsilon,
    library_versions,
)
from dpzo.privacy.calibration import calibrate_sigma, laplace_step_epsilon, memoized, opacus_noise_multiplier


def _json_float(x: float) -> float | str:
    """JSON has no infinity; write it as the string "inf"."""
    return "inf" if math.isinf(x) else float(x)


@dataclass(frozen=True)
class _Run:
    """The validated numbers of one run's accounting (see :func:`accounting_record`)."""

    n: int
    batch_size: int
    steps: int
    directions: int
    clip: float
    eps_target: float
    delta: float
    accountant: str
    pld_discretization: float
    sigma: float | None  # given instead of calibrated

    @property
    def q(self) -> float:
        return self.batch_size / self.n

    @property
    def compositions(self) -> int:
        return self.steps * self.directions

    @property
    def calibrated_with(self) -> str | None:
        return self.accountant if self.sigma is None else None

    @property
    def private(self) -> bool:
        return not math.isinf(self.eps_target) if self.sigma is None else self.sigma > 0


def _checked_run(
    *, n, batch_size, steps, directions, clip, epsilon_target, delta, accountant, sigma, pld_discretization
) -> _Run:
    """The arguments of :func:`accounting_record`, validated (ValueError names the bad one)."""
    try:
        n = operator.index(n)
        batch_size = operator.index(batch_size)
        steps = operator.index(steps)
        directions = operator.index(directions)
    except TypeError as err:
        raise ValueError(f"n, batch_size, steps and directions must be integers ({err})") from None
    if n < 1:
        raise ValueError(f"n (number of training examples) must be >= 1; got {n}")
    if not (1 <= batch_size <= n):
        raise ValueError(f"batch_size must satisfy 1 <= batch_size <= n (n={n}); got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1; got {directions}")
    clip = float(clip)
    if not clip > 0:  # inf (no clipping) is allowed for non-private runs, checked below
        raise ValueError(f"clip must be > 0; got {clip!r}")
    eps_target = float(epsilon_target)
    if math.isnan(eps_target) or eps_target < 0:
        raise ValueError(f"epsilon_target must be >= 0 (inf allowed); got {epsilon_target!r}")
    delta = check_delta(delta)
    accountant = check_accountant(accountant)
    pld_discretization = check_pld_discretization(pld_discretization)
    if sigma is not None:
        sigma = check_sigma(sigma)
        if math.isinf(sigma):
            raise ValueError("sigma must be finite; got inf")
    run = _Run(n, batch_size, steps, directions, clip, eps_target, delta, accountant, pld_discretization, sigma)
    if run.private and math.isinf(clip):
        raise ValueError("clip must be finite for a private run (sensitivity would be infinite); got inf")
    return run


def _calibrate_and_check(run: _Run) -> dict[str, Any]:
    """σ (calibrated unless given) and the ε it achieves under every accountant."""
    s = run.sigma
    if s is None:
        s = calibrate_sigma(
            run.eps_target,
            run.delta,
            run.q,
            run.compositions,
            run.accountant,
            pld_discretization=run.pld_discretization,
        )
    achieved: dict[str, float | str] = {}
    for name in ACCOUNTANTS:
        if s == 0:
            achieved[name] = "inf"
            continue
        try:
            achieved[name] = _json_float(
                epsilon(s, run.q, run.compositions, run.delta, name, pld_discretization=run.pld_discretization)
            )
        except (RuntimeError, ValueError, FloatingPointError) as err:
            if name == run.calibrated_with:
                raise
            # A cross-check that a library cannot evaluate (e.g. PRV's discretisation at very
            # small sigma) must not block the run; the calibrating accountant still holds.
            achieved[name] = f"not computed: {type(err).__name__}: {err}"
    return {"sigma": s, "epsilon_achieved": achieved}


def _certifies(run: _Run, cached: dict[str, Any]) -> bool:
    """A cached sigma is used only if it still buys the target (one accountant evaluation)."""
    if run.calibrated_with is None or not run.private:
        return True
    s = float(cached["sigma"])
    if not s > 0 or exceeds_at_first_release(s, run.q, run.delta, run.eps_target) is not None:
        return False  # an absurd σ: refused by the cheap bound, before the accountant's grid
    achieved = epsilon_unchecked(s, run.q, run.compositions, run.delta, run.calibrated_with, run.pld_discretization)
    return achieved <= run.eps_target and cached["epsilon_achieved"].get(run.calibrated_with) == _json_float(achieved)


def accounting_record(
    *,
    n: int,
    batch_size: int,
    steps: int,
    directions: int = 1,
    clip: float,
    epsilon_target: float,
    delta: float,
    accountant: str = "pld",
    sigma: float | None = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Calibrate (unless ``sigma`` is given) and describe the privacy of one training run.

    Args:
        n: number of training examples (``>= 1``).
        batch_size: expected batch size; ``q = batch_size / n`` (``1 <= batch_size <= n``).
        steps: training steps ``T``.
        directions: perturbation directions per step ``P`` (each draws its own batch).
        clip: clipping threshold C of per-example values (the sum's sensitivity); ``inf``
            (no clipping) only for non-private runs, recorded as ``"inf"``.
        epsilon_target: target epsilon; ``inf`` for a non-private run (sigma 0).
        delta: target delta.
        accountant: accountant used for calibration (``"pld"``, ``"prv"``, ``"rdp"``).
        sigma: use this noise multiplier instead of calibrating (``calibrated_with`` is
            then ``None``); ``epsilon_achieved`` shows what it buys.
        pld_discretization: PLD discretization for calibration and ``epsilon_achieved``.
        cache_dir: where to keep the calibrated sigma and the achieved epsilons, keyed by
            everything they depend on (:func:`memoized`): the cells of a grid share a few
            calibrations, which take up to tens of seconds each.

    Returns:
        A JSON-serialisable dict (infinities are the string ``"inf"``); see the keys below.
    """
    run = _checked_run(
        n=n,
        batch_size=batch_size,
        steps=steps,
        directions=directions,
        clip=clip,
        epsilon_target=epsilon_target,
        delta=delta,
        accountant=accountant,
        sigma=sigma,
        pld_discretization=pld_discretization,
    )
    key = dict(
        epsilon_target=_json_float(run.eps_target),
        delta=run.delta,
        q=run.q,
        compositions=run.compositions,
        calibrated_with=run.calibrated_with,
        sigma=run.sigma,
        pld_discretization=run.pld_discretization,
        library_versions=library_versions(),
    )
    numbers = memoized(cache_dir, key, lambda: _calibrate_and_check(run), verify=lambda cached: _certifies(run, cached))
    sigma = float(numbers["sigma"])
    return {
        "private": run.private,
        "epsilon_target": _json_float(run.eps_target),
        "delta": run.delta,
        "sigma": sigma,
        "noise_multiplier": sigma,
        "q": run.q,
        "n": run.n,
        "expected_batch_size": float(run.batch_size),
        "steps": run.steps,
        "directions": run.directions,
        "compositions": run.compositions,
        "clip": _json_float(run.clip),
        "sampler": "poisson",
        "neighbouring": ADD_REMOVE,
        "sensitivity": _json_float(run.clip),
        "mechanism": "gaussian",
        # The trainer adds exactly this: N(0, noise_std_on_sum^2) on each clipped sum.
        "noise_std_on_sum": sigma * run.clip if run.private else 0.0,
        "calibrated_with": run.calibrated_with,
        "pld_discretization": run.pld_discretization,
        "epsilon_achieved": numbers["epsilon_achieved"],
        "library_versions": library_versions(),
    }


#: DPZero's published accounting is at delta = 1e-5 whatever the config says (their code's value).
DPZERO_DELTA = 1e-5


def dpzero_published_record(
    *, n: int, batch_size: int, steps: int, clip: float, epsilon_target: float, delta: float = DPZERO_DELTA
) -> dict[str, Any]:
    """DPZero's own accounting (Zhang et al. 2024, their code): replace-one neighbours.

    sigma comes from opacus' RDP calibration for a sensitivity-1 add/remove query; the noise
    on the clipped sum is ``2 sigma C`` because replacing one example moves the sum by up to
    2C.  For comparison with the other methods, the record also gives the epsilon of the same
    noise under this project's convention (add/remove, sensitivity C: multiplier 2 sigma).
    """
    q = batch_size / n
    record = accounting_record(
        n=n, batch_size=batch_size, steps=steps, clip=clip, epsilon_target=epsilon_target, delta=delta, sigma=0.0
    )
    if math.isinf(float(epsilon_target)):
        return record | {"accounting": "dpzero-published"}
    sigma = opacus_noise_multiplier(float(epsilon_target), delta, q, steps)
    common = {name: _json_float(epsilon(2 * sigma, q, steps, delta, name)) for name in ACCOUNTANTS}
    return record | {
        "private": True,
        "accounting": "dpzero-published",
        "sigma": sigma,
        "noise_multiplier": sigma,
        "neighbouring": "replace one example (DPZero)",
        "sensitivity": 2 * clip,
        "noise_std_on_sum": 2 * sigma * clip,
        "calibrated_with": "opacus-rdp",
        "epsilon_achieved": {"opacus-rdp": float(epsilon_target)},
        "epsilon_add_remove": common,
        # DPZero's code divides B by the nominal k * classes; with fewer real examples (TREC's
        # rare class) that understates q, so the real training-set size is used here
        "sampling_rate_from": "the real training-set size n (DPZero's code: the nominal k x classes)",
        "library_versions": library_versions() | {"opacus": distribution_version("opacus")},
    }


def laplace_record(
    *, n: int, batch_size: int, steps: int, directions: int, clip: float, epsilon_target: float
) -> dict[str, Any]:
    """Pure epsilon-DP accounting of the Laplace variant of DP-ZO (Tang et al. 2024)."""
    q = batch_size / n
    compositions = steps * directions
    record = accounting_record(
        n=n,
        batch_size=batch_size,
        steps=steps,
        directions=directions,
        clip=clip,
        epsilon_target=epsilon_target,
        delta=0.5,
        sigma=0.0,
    )
    record.update(mechanism="laplace", delta=0.0, accounting="pure-dp: subsampling amplification + basic composition")
    if math.isinf(float(epsilon_target)):
        return record
    eps_step, eps0 = laplace_step_epsilon(float(epsilon_target), q, compositions)
    record.update(
        private=True,
        sigma=None,
        noise_multiplier=None,
        epsilon_per_release=eps_step,
        epsilon_unamplified=eps0,
        laplace_scale_on_sum=clip / eps0,
        noise_std_on_sum=math.sqrt(2) * clip / eps0,
        calibrated_with="laplace-basic-composition",
        epsilon_achieved={"pure": laplace_epsilon(eps0, q, compositions)},
    )
    return record


def method_ledger(
    method: str,
    *,
    n: int,
    batch_size: int,
    steps: int,
    directions: int,
    clip: float,
    epsilon_target: float,
    delta: float,
    accountant: str = "pld",
    convention: str = "common",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The privacy ledger of one cell, for any method (``cache_dir``: see :func:`accounting_record`).

    ``convention="common"`` (default) accounts every method the same way: Poisson sampling,
    add/remove neighbours, ``accountant`` for sigma at ``delta``.  ``"published"`` uses each
    method's own published accounting where it differs (DPZero: opacus RDP, replace-one,
    delta = 1e-5).  The Laplace variant is pure epsilon-DP under either convention.
    """
    from dpzo.methods import base_method, get_method, is_private

    base = base_method(method)  # a variant ("dpzero+c50") is accounted like its method
    if convention not in ("common", "published"):
        raise ValueError(f"accounting convention must be 'common' or 'published'; got {convention!r}")
    common = dict(n=n, batch_size=batch_size, steps=steps, clip=clip, epsilon_target=epsilon_target)
    if not is_private(method):
        record = {
            "private": False,
            "epsilon_target": "inf",
            "n": n,
            "steps": steps,
            "neighbouring": "none: this method makes no privacy claim",
        }
    elif get_method(base).neighbouring != ADD_REMOVE:
        raise ValueError(
            f"{method} declares the neighbouring relation {get_method(base).neighbouring!r}; the accountants "
            f"here cover Poisson sampling under {ADD_REMOVE!r} (or a method's own published accounting)"
        )
    elif get_method(base).mechanism == "laplace":
        record = laplace_record(directions=directions, **common)
    elif get_method(base).published_accounting == "dpzero" and convention == "published":
        if directions != 1:
            raise ValueError("DPZero's published accounting has one direction per step")
        record = dpzero_published_record(**common)
    else:
        # the method says how many of its releases a step makes (DP-AggZO: one for K directions)
        per_step = get_method(base).releases_per_step(directions)
        record = accounting_record(
            directions=per_step, delta=delta, accountant=accountant, cache_dir=cache_dir, **common
        )
        record["directions"] = directions
        record["accounting"] = "common"
    record["method"] = method
    return record
